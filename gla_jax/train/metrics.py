"""Run observability: ``metrics.jsonl`` (one JSON object per logged step), TensorBoard events, a progress bar."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if hasattr(v, "item"):
        return _clean(v.item())
    return v


class MetricsWriter:
    """Appends to ``<workdir>/metrics.jsonl`` and writes TensorBoard scalars to ``<workdir>/tensorboard`` (only on
    the main process; other processes get a no-op writer)."""

    def __init__(self, workdir: str | Path, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self._fh = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", buffering=1)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))
            except Exception:  # noqa: BLE001 - TensorBoard is optional
                self._tb = None

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
        self._fh.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def read_metrics(workdir: str | Path) -> list[dict]:
    """All records of ``<workdir>/metrics.jsonl`` (a resumed run appends; later records for a step win in
    ``by_step``)."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def by_step(records: list[dict], key: str = "loss") -> dict[int, float]:
    out = {}
    for r in records:
        if key in r:
            out[int(r["step"])] = r[key]
    return out


class Progress:
    """tqdm bar over optimizer steps with ETA and tokens/s (disabled off the main process or when asked)."""

    def __init__(self, total: int, initial: int, enabled: bool = True, log=print):
        self.bar = None
        self.log = log
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                                mininterval=1.0, smoothing=0.1)
            except Exception:  # noqa: BLE001
                self.bar = None

    def update(self, n: int, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            self.log(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
