# 2026-11-30T03:21:17Z on vm, commit e7de00f
launch/scaling weak --ranks "2" --algorithms "ring:zigzag ring:contiguous rsa ulysses allgather lasp1 lasp2 tpla" --tokens-per-rank 2048 --heads 16 --head-dim 64 --repeats 2 --warmup 1 --bind core --no-baseline --out /root/out/r/weak/p2
