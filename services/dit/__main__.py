from disagfusion.worker.stage_worker import main
from services.dit.worker import DitWorker

main("denoise", DitWorker)
