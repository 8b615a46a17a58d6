# 2026-11-24T16:52:01Z on vm, commit c607ebd
launch/scaling strong --ranks "1 2 4 8 16" --algorithms "ring:zigzag lasp2" --seq-len 65536 --heads 1 --head-dim 64 --repeats 2 --warmup 1 --bind core --out /root/out/s5/strong64k
