// `seqpar decode`: the prefill -> decode handoff of `Latent/Decode.swift`, timed and checked on every rank.
// The handoff's traffic is its one collective (plus, for PCA, the all-reduce of the d_c x d_c second moment).

public struct DecodeReport: Codable, Sendable {
    public var bench = "decode"
    public var algorithm: LatentAlgorithm
    public var backend: String
    public var ranks: Int
    public var config: DecodeConfig
    public var prefillS: Double, handoffS: Double
    /// Payload each rank sent in the handoff's one collective.
    public var handoffBytesSent: [Int]
    /// Decode step latency, slowest rank: median, min, max over the steps.
    public var stepS: Double, stepMinS: Double, stepMaxS: Double
    /// Latent cache each rank holds after the last step, and what one step sends and how many collectives it makes.
    public var cacheBytes: [Int]
    public var stepBytesSent: Int, stepCollectives: Int, stepMessages: Int
    /// Prefill output (gathered) against the same prefill computed in one process (fp32 kernel), with --check.
    public var prefillError: Double?
    /// Decode outputs y = o W_O against single-process MLA decoding over the same cache: max over steps of the
    /// relative error.
    public var differenceFromMLA: Double
    public var passed: Bool?
}

public enum DecodeRun {
    public static func execute(_ initial: DecodeConfig, comm: some Communicator, backend: String, ranksPerHost: Int = 1,
                               log: (String) -> Void = { _ in }) throws -> DecodeReport {
        let (rank, ranks) = (comm.rank, comm.size)
        var config = initial
        var failure: Error?
        var weights: MLAWeights?
        do {
            if let dir = config.weightsDirectory { weights = try MLAWeights.read(directory: dir, into: &config) }
        } catch { failure = error }
        try comm.agree(failure)
        try AttentionRun.agreeOnConfiguration(config, comm: comm)
        do {
            try config.validate(ranks: ranks)
            let f = MemoryLayout<Float>.size
            let local = config.layout.counts(ranks: ranks, length: config.promptLength).max() ?? 0
            let (l, h, kd) = (config.promptLength + config.steps, config.heads, config.nopeDim + config.ropeDim)
            let need = f * (local * (config.modelDim + 6 * h * kd + 2 * config.latentDim) + 2 * l * (config.latentDim + config.ropeDim)
                            + 3 * h * config.latentDim * (config.nopeDim + config.vDim) + config.modelDim * (config.latentDim + h * kd))
                + (config.check && rank == 0 ? f * config.promptLength * (config.modelDim + 8 * h * kd) : 0)
            if let available = SystemInfo.availableMemory(), need * ranksPerHost > available {
                throw SeqParError.outOfMemory("decode needs about \(SystemInfo.bytesText(need)) per rank x \(ranksPerHost) rank(s) here, and this machine has \(SystemInfo.bytesText(available)) available: use a shorter --prompt-len or more machines")
            }
        } catch { failure = error }
        try comm.agree(failure)

        let w = weights ?? MLAWeights(config)
        let (dc, dr, dn, dv, hN) = (config.latentDim, config.ropeDim, config.nopeDim, config.vDim, config.heads)
        let kd = dn + dr
        let promptLength = config.promptLength
        let positions = config.layout.positions(rank: rank, ranks: ranks, length: promptLength)
        let n = positions.count

        // 1. Prefill: decompressed heads, ring attention.
        try comm.barrier()
        var t = SystemInfo.now()
        let x = SeededInputs.hidden(.hidden, seed: config.seed, batch: 1, length: promptLength, width: config.modelDim, positions: positions)
        let proj = Projected(x, positions: positions, weights: w, config: config)
        let local = decompress(proj, positions: positions, weights: w, config: config)
        let prefill = try RingAttention().forward(local, comm: comm)
        let prefillS = try comm.allReduce([SystemInfo.now() - t], op: .max)[0]

        // 2. Handoff.
        try comm.barrier()
        comm.resetCounters()
        t = SystemInfo.now()
        // PCA is built below from the second moment of every rank's rows.
        var r = config.transform == .pca ? nil : try config.transform.matrix(latentDim: dc)
        if config.transform == .pca {
            let moment = Tensor(zeros: [dc, dc])
            BLAS.gemm(proj.c.matrix, transposeA: true, proj.c.matrix, into: moment.matrix)
            try comm.allReduce(moment.buffer, op: .sum)
            r = try LatentTransform.pca(secondMoment: moment, tokens: promptLength, slices: config.algorithm == .tpla ? ranks : 1)
        }
        let (heads, cols) = LatentShard.split(config.algorithm, heads: hN, latentDim: dc, rank: rank, ranks: ranks)
        let width = cols.count + dr
        let cache = try handoff(proj, transform: r, config: config, comm: comm)
        let allPositions = (0..<ranks).map { config.layout.positions(rank: $0, ranks: ranks, length: promptLength) }
        let counts = allPositions.map(\.count)
        let handoffS = try comm.allReduce([SystemInfo.now() - t], op: .max)[0]
        let handoffBytes = try comm.allGather([comm.counters.bytesSent]).map { $0[0] }

        // The reference (rank 0): the untransformed whole cache, gathered outside the timed steps.
        let plain = LatentAttention.concatenate(proj.c.matrix, proj.kr.matrix)
        let gathered = Tensor(uninitialized: [promptLength * (dc + dr)])
        try comm.allGatherV(UnsafeBufferPointer(plain.buffer), into: gathered.buffer, counts: counts.map { $0 * (dc + dr) })
        let reference = Tensor(zeros: rank == 0 ? [promptLength + config.steps, dc + dr] : [0, dc + dr])
        if rank == 0 { place(gathered, into: reference, rowWidth: dc + dr, positions: allPositions) }

        // 3. Decode.
        let wShard = LatentShard.valueRows(w.wUV, transform: r, cols: cols, heads: heads)
        var steps: [Double] = [], difference = 0.0
        var stepCounters = CommCounters()
        for step in 0..<config.steps {
            let position = promptLength + step
            let xt = SeededInputs.hidden(.decodeHidden, seed: config.seed, batch: 1, length: promptLength + config.steps, width: config.modelDim, positions: [position])
            try comm.barrier()
            comm.resetCounters()
            t = SystemInfo.now()
            let p = Projected(xt, positions: [position], weights: w, config: config)
            let latentRow = LatentShard.columns(p.c.matrix, transform: r, cols: cols)
            (cache.pointer + position * width).update(from: latentRow.pointer, count: cols.count)
            (cache.pointer + position * width + cols.count).update(from: p.kr.pointer, count: dr)
            let qc = p.absorbed(w, config), qr = p.ropeQueries(config)
            let shard = LatentShard(cache: cache.rows(0..<(position + 1)),
                                    queries: LatentShard.queryRows(qLatent: qc, qRope: qr, transform: r, cols: cols, heads: heads),
                                    heads: heads, latentCols: cols.count, wUV: wShard)
            let o = try LatentParallel.combine(config.algorithm, shard.attend(vDim: dv, scale: config.scale),
                                               shape: LatentShape(seqLen: position + 1, queries: 1, heads: hN, latentDim: dc, ropeDim: dr, vDim: dv), comm: comm)
            let elapsed = SystemInfo.now() - t
            if step == 0 { stepCounters = comm.counters }
            steps.append(try comm.allReduce([elapsed], op: .max)[0])
            if rank == 0 {
                (reference.pointer + position * (dc + dr)).update(from: p.c.pointer, count: dc)
                (reference.pointer + position * (dc + dr) + dc).update(from: p.kr.pointer, count: dr)
                let mla = LatentShard(cache: reference.rows(0..<(position + 1)),
                                      queries: LatentShard.queryRows(qLatent: qc, qRope: qr, transform: nil, cols: 0..<dc, heads: 0..<hN),
                                      heads: 0..<hN, latentCols: dc, wUV: w.wUV).attend(vDim: dv, scale: config.scale)
                difference = max(difference, relativeError(w.output(o), w.output(mla).toArray().map(Double.init)))
            }
        }

        // The prefill against one process (rank 0 recomputes every token's projections and runs the kernel once).
        var prefillError = -1.0
        let out = Tensor(uninitialized: [1, n, hN, dv])
        for i in 0..<(n * hN) { (out.pointer + i * dv).update(from: prefill.o.pointer + i * kd, count: dv) }
        let oAll = try config.layout.gather(out, length: promptLength, comm: comm)
        if config.check && rank == 0 {
            log("checking the prefill against one process")
            let all = Array(0..<promptLength)
            let xg = SeededInputs.hidden(.hidden, seed: config.seed, batch: 1, length: promptLength, width: config.modelDim, positions: all)
            let g = decompress(Projected(xg, positions: all, weights: w, config: config), positions: all, weights: w, config: config)
            let single = SoftmaxAttention.forward(q: g.q, qPositions: all, k: g.k, v: g.v, kPositions: all, causal: true, scale: config.scale)
            var expected = [Double](repeating: 0, count: promptLength * hN * dv)
            for i in 0..<(promptLength * hN) { for d in 0..<dv { expected[i * dv + d] = Double(single.o.pointer[i * kd + d]) } }
            prefillError = relativeError(oAll, expected)
        }
        var verdict = [difference, prefillError]
        try verdict.withUnsafeMutableBufferPointer { try comm.broadcast($0, root: 0) }
        let cacheBytes = try comm.allGather([cache.count * MemoryLayout<Float>.size]).map { $0[0] }
        let passed: Bool? = config.check ? verdict[1] <= 2e-5 && (config.algorithm == .tpla || verdict[0] <= 2e-5) : nil
        let sorted = steps.sorted()
        let report = DecodeReport(
            algorithm: config.algorithm, backend: backend, ranks: ranks, config: config, prefillS: prefillS, handoffS: handoffS,
            handoffBytesSent: handoffBytes, stepS: KernelBench.median(steps), stepMinS: sorted.first ?? 0, stepMaxS: sorted.last ?? 0,
            cacheBytes: cacheBytes, stepBytesSent: stepCounters.bytesSent, stepCollectives: stepCounters.collectives,
            stepMessages: stepCounters.messagesSent, prefillError: verdict[1] < 0 ? nil : verdict[1], differenceFromMLA: verdict[0], passed: passed)
        if passed == false {
            throw SeqParError.checkFailed(String(format: "prefill error %.2e against one process (tolerance 2e-05)%@", verdict[1],
                                                 config.algorithm == .tpla ? "" : String(format: ", decode %.2e against MLA (tolerance 2e-05)", verdict[0])))
        }
        return report
    }

    /// Rows arrive in rank order, each rank's in its positions' order: puts each at its global position.
    static func place(_ received: Tensor, into target: Tensor, rowWidth: Int, positions: [[Int]]) {
        var offset = 0
        for rankPositions in positions {
            for p in rankPositions {
                (target.pointer + p * rowWidth).update(from: received.pointer + offset * rowWidth, count: rowWidth)
                offset += 1
            }
        }
    }

    /// The handoff: this rank's prefilled rows (projections `p`) into its decode cache, (L + steps) x (its latent
    /// columns + d_r), rows in global order: TPLA, one all-to-all of [c R[:, slice_g] | k_r]; TP-MLA, one all-gather.
    public static func handoff(_ p: Projected, transform r: Tensor?, config: DecodeConfig, comm: some Communicator) throws -> Tensor {
        let (rank, ranks) = (comm.rank, comm.size)
        let (dc, dr, promptLength, n) = (config.latentDim, config.ropeDim, config.promptLength, p.c.shape[0])
        let cols = LatentShard.split(config.algorithm, heads: config.heads, latentDim: dc, rank: rank, ranks: ranks).cols
        let width = cols.count + dr
        let cache = Tensor(zeros: [promptLength + config.steps, width])
        let counts = config.layout.counts(ranks: ranks, length: promptLength)
        let allPositions = (0..<ranks).map { config.layout.positions(rank: $0, ranks: ranks, length: promptLength) }
        if config.algorithm == .tpla {
            // Rank g receives [c R[:, slice_g] | k_r] of every row: one all-to-all.
            let sliceWidth = dc / ranks
            let send = Tensor(uninitialized: [ranks * n * (sliceWidth + dr)])
            let transformed = LatentShard.columns(p.c.matrix, transform: r, cols: 0..<dc)
            for g in 0..<ranks {
                for i in 0..<n {
                    let dst = send.pointer + (g * n + i) * (sliceWidth + dr)
                    dst.update(from: transformed.pointer + i * dc + g * sliceWidth, count: sliceWidth)
                    (dst + sliceWidth).update(from: p.kr.pointer + i * dr, count: dr)
                }
            }
            let received = Tensor(uninitialized: [promptLength * (sliceWidth + dr)])
            try comm.allToAllV(UnsafeBufferPointer(send.buffer), counts: Array(repeating: n * (sliceWidth + dr), count: ranks),
                               into: received.buffer, counts: counts.map { $0 * (sliceWidth + dr) })
            place(received, into: cache, rowWidth: width, positions: allPositions)
        } else {
            // TP-MLA (or MLA on one rank): every rank keeps the whole cache.
            let transformed = LatentShard.columns(p.c.matrix, transform: r, cols: 0..<dc)
            let mine = withExtendedLifetime(transformed) { LatentAttention.concatenate(transformed.matrix, p.kr.matrix) }
            let received = Tensor(uninitialized: [promptLength * (dc + dr)])
            try comm.allGatherV(UnsafeBufferPointer(mine.buffer), into: received.buffer, counts: counts.map { $0 * (dc + dr) })
            place(received, into: cache, rowWidth: width, positions: allPositions)
        }
        return cache
    }

    /// The prefill's decompressed heads: q (1, n, H, d_n + d_r), k = [c W_UK,h | k_r] and v = [c W_UV,h | 0] at the
    /// same width.
    static func decompress(_ p: Projected, positions: [Int], weights w: MLAWeights, config c: DecodeConfig) -> LocalAttention {
        let n = positions.count
        let (dc, dr, dn, dv, hN) = (c.latentDim, c.ropeDim, c.nopeDim, c.vDim, c.heads)
        let kd = dn + dr
        let k = Tensor(zeros: [1, n, hN, kd]), v = Tensor(zeros: [1, n, hN, kd])
        for h in 0..<hN {
            BLAS.gemm(p.c.matrix, Matrix(base: w.wUK.pointer + h * dc * dn, rows: dc, cols: dn),
                      into: Matrix(base: k.pointer + h * kd, rows: n, cols: dn, ld: hN * kd))
            BLAS.gemm(p.c.matrix, Matrix(base: w.wUV.pointer + h * dc * dv, rows: dc, cols: dv),
                      into: Matrix(base: v.pointer + h * kd, rows: n, cols: dv, ld: hN * kd))
            for i in 0..<n { (k.pointer + (i * hN + h) * kd + dn).update(from: p.kr.pointer + i * dr, count: dr) }
        }
        return LocalAttention(shape: AttentionShape(seqLen: c.promptLength, heads: hN, headDim: kd),
                              options: AttentionOptions(causal: true, layout: c.layout, scale: c.scale), positions: positions,
                              q: p.q.reshaped([1, n, hN, kd]), k: k, v: v)
    }
}
