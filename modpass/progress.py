"""Progress output for the verbs that capture and route blocks (seconds per block, minutes per model)."""

from __future__ import annotations

from tqdm import tqdm

from .errors import ConfigError


class Progress:
    """A tqdm bar on stderr counting routed blocks, with the current stage as its postfix.

    ``enabled``: ``None`` shows it where stderr is a terminal (tqdm's own
    test, so logs and CI stay quiet), ``True`` always, ``False`` never. Use
    it as a context manager: the bar closes when the verb returns or fails.
    """

    def __init__(self, enabled: bool | None, verb: str, blocks: int | None = None) -> None:
        if enabled is not None and not isinstance(enabled, bool):
            raise ConfigError(f"{verb}: progress must be True, False or None (on a terminal only), got {enabled!r}.")
        self._bar = tqdm(total=blocks, desc=f"modpass.{verb}", unit="block", disable=None if enabled is None else not enabled,
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

    def __exit__(self, *exc_info) -> None:
        self._bar.set_postfix_str("")
        self._bar.close()
