from disagfusion.stage import main
from services.decoder.worker import DecoderWorker

main("decode", DecoderWorker)
