"""Loft: thin wrappers around Axolotl, PEFT and llama.cpp. One module per `loft` verb."""
