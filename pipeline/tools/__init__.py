"""The tools around the stages: recipes, `gptpipe init` and `gptpipe doctor`. No stage imports them."""
