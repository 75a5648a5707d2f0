"""MM-DPO: loss with dynamic reward scaling and an SFT term, group collator, trainer."""
