from disagfusion.worker.stage_worker import main
from services.pipeline.worker import PipelineWorker

main("encode", PipelineWorker)
