"""Client-level differential privacy: noise, adaptive clipping, the accountant and the budget.

- ``noise``: Gaussian noise of DP-FedAvg, central and per-worker shares (McMahan et al. 2018)
- ``adaptive``: adaptive clipping toward a norm quantile (Andrew et al. 2021)
- ``accountant``: ε from dp-accounting (RDP, PLD) for fedbus's fixed-size cohort sampling
- ``budget``: what the coordinator's round machine asks before opening a round
- ``central``: the server-side rule (clip, weight 1, sum, noise)
- ``spec``: the job spec's ``privacy`` section
"""
