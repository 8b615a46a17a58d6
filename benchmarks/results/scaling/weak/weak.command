# 2026-11-24T16:20:07Z on vm, commit c607ebd
launch/scaling weak --ranks "1 2 4 8 16" --algorithms "ring:zigzag ring:contiguous rsa ulysses allgather lasp1 lasp2 tpla" --tokens-per-rank 2048 --heads 16 --head-dim 64 --repeats 2 --warmup 1 --bind core --out /root/out/s3/weak
