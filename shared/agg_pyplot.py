"""matplotlib's pyplot for files (the Agg backend: no display needed), imported whole before a
stop signal can act: `learning_curve.png` in training, the benchmark's figures."""

from __future__ import annotations

from types import ModuleType

from splitdet.shared.sigterm import stops_held


def agg_pyplot() -> ModuleType:
    """`matplotlib.pyplot` on the Agg backend. Its first import loads matplotlib's C extensions
    (ft2font, the Agg renderer) with SIGTERM and Ctrl-C held (`sigterm.stops_held`): a stop
    met there is raised once they are loaded, not inside their initialisation, which it left
    half done: the interpreter then aborted at exit ("Fatal Python error: PyThreadState_Get",
    exit status 134) after the stopped command's last line."""
    with stops_held():
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.backends.backend_agg  # (its extension, loaded now)
        import matplotlib.pyplot as plt
    return plt
