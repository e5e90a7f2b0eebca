"""The monolithic pipeline service: one process runs every stage of a job, the baseline the
disaggregated stack is measured against and a sensible deployment for one small device."""
