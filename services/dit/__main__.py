from disagfusion.stage import main

main("denoise")
