"""Recordings: every robot's episodes as MCAP files with Foxglove's schemas, and the same live over Foxglove's
websocket (`vigil serve --record DIR`, `--foxglove-ws PORT`; docs/recording.md).

Not onboard: this package needs foxglove-sdk and mcap (`pip install 'vigil[record]'`), so the runtime imports it by
name only when a recording is asked for (runtime/extras.py). It may import the onboard packages.

    hook.py     the loop's side: copy what a tick decided into a bounded queue, report failures
    writer.py   the writer thread: turn queued events into messages, rotate files, flush, stop on a disk error
    files.py    where an episode's file goes and when it is rotated
    topics.py   what a tick becomes: topics and Foxglove messages
    read.py     reading a recording back, also one cut short by a crash
"""
