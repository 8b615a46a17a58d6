# 2026-11-24T16:25:30Z on vm, commit c607ebd
launch/scaling strong --ranks "1 2 4 8 16" --algorithms "ring:zigzag ring:contiguous rsa ulysses allgather lasp1 lasp2 tpla" --seq-len 8192 --heads 16 --head-dim 64 --repeats 2 --warmup 1 --bind core --decode-len 262144 --out /root/out/s4/strong
