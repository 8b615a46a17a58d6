# 2026-11-30T03:21:42Z on vm, commit e7de00f
launch/scaling strong --ranks "2" --algorithms "ring:zigzag ring:contiguous rsa ulysses allgather lasp1 lasp2 tpla" --seq-len 8192 --heads 16 --head-dim 64 --repeats 2 --warmup 1 --bind core --no-baseline --decode-len 262144 --out /root/out/r/strong/p2
