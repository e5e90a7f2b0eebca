from disagfusion.worker.stage_worker import main
from services.decoder.worker import DecoderWorker

main("decode", DecoderWorker)
