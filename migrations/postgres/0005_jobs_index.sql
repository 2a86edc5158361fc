-- Claiming a job checks that no earlier phase of its run is still open: an index probe.
CREATE INDEX jobs_run_open ON jobs(run_id, status, phase);
