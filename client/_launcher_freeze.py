"""Imported last by `WorkerLauncher`'s fork server, after the modules it preloads: moves
every object alive now into the collector's permanent generation. Workers forked from it
then never traverse those objects in a collection (a traversal writes to each object's
header, and the write copies its page out of the memory they share with the launcher).

The launcher thaws them when it exits, so its own shutdown frees them as usual (extension
modules that count their live objects at exit would otherwise report leaks). Workers leave
through `os._exit` and never run it."""

import atexit
import gc

gc.collect()
gc.freeze()
atexit.register(gc.unfreeze)
