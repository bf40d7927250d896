"""Training: the loop of stage 02 and its parts.

loop (one fold of one seed, resumable), step (one optimisation step, every device), recipe
(net, optimizer, schedule, EMA from the config), resume (seeds, RNG states, earlier runs),
losses, validate, records (log.csv, curves.png), board (TensorBoard), distributed (DDP),
gpus (one job per GPU).
"""
