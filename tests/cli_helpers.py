"""Running a CLI's `main(argv)` in the test process the way a terminal would see it."""
import logging


def call_main(main, argv) -> int:
    """`main([str(a) for a in argv])` with the root logger's handlers cleared around the call, so the CLI's own
    logging set-up writes to the (captured) stderr; the handlers and level are restored afterwards."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers[:] = []
    try:
        return main([str(a) for a in argv])
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
