"""Every byte on disk: reference folders (`references`), the reference bundle (`bundle`), shards and
completion markers (`shards`), manifest (`manifest`), run record (`run_record`), pilot and reach caches
(`pilot`, `reach`), evaluation files (`eval_io`).

Writes are atomic (`atomic`: temporary name in the same folder, fsync, rename; `atomic_write_json`,
`atomic_write_bytes` and `atomic_open` for any other file the project writes); bad user input raises
`errors.InputError` with one line naming the file and the problem.

Import each name from the module that defines it. This package imports nothing, so
`import storage.manifest` (or `storage.run_record`) does not pull in torch and Pillow.
"""
