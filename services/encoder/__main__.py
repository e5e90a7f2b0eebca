from disagfusion.worker.stage_worker import main
from services.encoder.worker import EncoderWorker

main("encode", EncoderWorker)
