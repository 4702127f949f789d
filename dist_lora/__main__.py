from dist_lora.cli import entry

entry()
