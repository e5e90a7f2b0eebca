"""The stage worker every stage service runs (``stage_worker``), the rules it decides by
(``policy``, shared with the scheduler's simulation, which must not pay for importing torch)
and its ledger of held tasks (``in_flight``)."""
