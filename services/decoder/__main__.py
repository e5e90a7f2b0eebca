from disagfusion.worker.stage_worker import main

main("decode")
