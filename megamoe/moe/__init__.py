"""Mixture-of-Experts layers: route -> dispatch -> experts -> combine (see layer.py).

One file per concept: router.py (learned top-k + the RouterOutput contract), hashing.py (hash
routing tables), hash_moe.py (DeepSeek-V4 hash-MoE: a frozen token-id -> k experts table
chooses, a learned gate weights), dispatcher.py (permutation + expert-parallel all-to-all),
experts.py (FFN experts), mpo.py (MPO experts with a shared central tensor), grad_mask.py (central-tensor
gradient masks), balance.py (sequence / global-batch balance losses, expert bias),
upcycle.py (dense -> experts), layer.py (MoELayer).
"""
