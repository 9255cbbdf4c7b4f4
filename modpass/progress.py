"""Progress output for the verbs that capture and route blocks (seconds per block, minutes per model)."""

from __future__ import annotations

from tqdm import tqdm

from .errors import ConfigError


class Progress:
    """A tqdm bar on stderr counting routed blocks (or another ``unit``), with the current stage as its postfix.

    ``enabled``: ``None`` shows it where stderr is a terminal (tqdm's own
    test, so logs and CI stay quiet), ``True`` always, ``False`` never. Use
    it as a context manager: the bar closes when the verb returns or fails.
    """

    def __init__(self, enabled: bool | None, verb: str, blocks: int | None = None, unit: str = "block") -> None:
        if enabled is not None and not isinstance(enabled, bool):
            raise ConfigError(f"{verb}: progress must be True, False or None (on a terminal only), got {enabled!r}.")
        self.enabled = enabled
        self._bar = tqdm(total=blocks, desc=f"modpass.{verb}", unit=unit, disable=None if enabled is None else not enabled,
                         dynamic_ncols=True)

    def stage(self, what: str) -> None:
        self._bar.set_postfix_str(what)

    def expect(self, blocks: int) -> None:
        """The number of blocks, once the plan knows it (``transform`` captures the model first)."""
        self._bar.reset(total=blocks)

    def block_done(self) -> None:
        self._bar.update()

    def __enter__(self) -> Progress:
        return self

    def close(self) -> None:
        self._bar.set_postfix_str("")
        self._bar.close()

    def __exit__(self, *exc_info) -> None:
        self.close()


class ModeSwitchProgress:
    """One bar over the routed blocks that prepare graphs when their model switches mode or converts, or their parts
    change.

    ``model.train()`` and ``model.to(...)`` (and a forward, after parts changed) visit the blocks one by one; the
    first block that has work opens the bar for the blocks that have it too,
    and the bar closes when they have all prepared.
    """

    def __init__(self, enabled: bool | None) -> None:
        self._enabled = enabled
        self._progress: Progress | None = None
        self._left = 0

    def block_starts(self, verb: str, pending: int, stage: str) -> None:
        """A block begins preparing for ``verb`` (``train``, ``eval``, ``to``, ``recapture``), shown as ``stage``;
        ``pending`` blocks, itself included, have yet to."""
        if self._left == 0:
            self._progress = Progress(self._enabled, verb, blocks=pending)
            self._progress.stage(stage)
            self._left = pending

    def block_done(self) -> None:
        self._left -= 1
        self._progress.block_done()
        if self._left == 0:
            self._progress.close()
            self._progress = None
