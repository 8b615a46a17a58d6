# 2026-11-30T03:25:23Z on vm, commit e7de00f
launch/scaling strong --ranks "4" --algorithms "ring:zigzag lasp2" --seq-len 65536 --heads 1 --head-dim 64 --repeats 2 --warmup 1 --bind core --no-baseline --out /root/out/r/strong64k/p4
