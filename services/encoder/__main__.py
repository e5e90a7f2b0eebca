from disagfusion.stage import main
from services.encoder.worker import EncoderWorker

main("encode", EncoderWorker)
