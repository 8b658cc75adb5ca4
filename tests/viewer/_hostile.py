"""A trace whose every name is an injection attempt, written by the real tracer: module names,
a scalar name, the file name and a metadata string are HTML, script and Markdown-link payloads.
Each payload, if interpreted, calls ``window.__pwned(<tag>)`` or adds an element with the id
``pwned`` (or a ``javascript:`` link): the UI test looks for any of them."""

from __future__ import annotations

from pathlib import Path

IMG = "<img src=x id=pwned onerror=__pwned(1)>"
SCRIPT = '"><script>__pwned(2)</script><b id=pwned>'
MDLINK = "[click](javascript:__pwned(3))"
SVG = "<svg onload=__pwned(4) id=pwned>"
QUOTE = "'];__pwned(5);//"  # breaks out of a naively quoted JS string
PAYLOADS = (IMG, SCRIPT, MDLINK, SVG, QUOTE)
FILE_NAME = "<img src=x id=pwned onerror=__pwned(6)>.arrow"


def make_hostile_trace(
    folder: Path,
    steps: int = 24,
    nan_step: int | None = 14,
    names: tuple[str, ...] = PAYLOADS,
    file_name: str = FILE_NAME,
    scalar: str = SVG,
) -> Path:
    """An MLP of layers named by the payloads, traced with per-unit statistics, anomaly
    origins, spectra and dynamics, a scalar with a hostile name, and a NaN planted in the
    payload-named layer at ``nan_step`` (so the NaN banners name it). ``names``, ``file_name``
    and ``scalar`` make the same trace with ordinary names (layout tests)."""
    import torch
    from torch import nn

    import dnntrace

    torch.manual_seed(0)
    model = nn.Sequential()
    widths = [16, 48, 40, 32, 24, 8]
    for i, name in enumerate(names):
        model.add_module(name, nn.Linear(widths[i], widths[i + 1]))
        if i < len(names) - 1:
            model.add_module(f"{name} act", nn.Tanh())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 16, generator=g), torch.randint(0, 8, (128,), generator=g)
    path = folder / file_name
    extras = {
        "activations_every": 1,  # every tab has every step (as the demo)
        "units": True,
        "on_anomaly": "record",
        # no activation sketch: its eigh fails on the planted NaN and disables tracing
        "spectral": {"full_every": 4, "activations": False},
        "dynamics": True,
    }
    with dnntrace.enable(model, str(path), **extras) as tr:
        for step in range(steps):
            if nan_step is not None and step == nan_step:
                with torch.no_grad():
                    getattr(model, names[0]).weight[0, 0] = float("nan")
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            tr.log_scalar(scalar, loss.detach())
            tr.log_scalar("loss", loss.detach())
            opt.step()
    return path
