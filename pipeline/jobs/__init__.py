"""The job: plain functions that prepare, run and finish it (`job`), one shard's work (`worker`), where
shards run (`executors`, `distributed`: the `accelerate launch -m pipeline.jobs.distributed` entry point,
`static_cluster`) and what the end of a job means as an exit status (`exit_codes`). Imports the checks
and the rooms below them."""
