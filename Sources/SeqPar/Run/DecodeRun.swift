// `seqpar decode`: the prefill -> decode handoff of `Latent/Decode.swift`, timed and checked on every rank.
// The handoff's traffic is its one collective (plus, for PCA, the all-reduce of the d_c x d_c second moment).
// bf16 (`--precision bf16`, oneDNN required on every rank first): the prefill's ring attention runs its bf16 kernel
// (its K/V blocks travel as the ring sends them); the handoff's collective carries the cache rows as bf16 (UInt16
// payloads: half the fp32 bytes); the decode cache is packed bf16 (half the bytes held and read per step) and each new
// row is rounded into it; queries are rounded for the kernel; scores, softmax, partial outputs and the step's
// all-reduce (or AllGather) stay fp32. The checks then compare with the fp32 references (the prefill in one process;
// MLA decoding in fp32 over the bf16-rounded cache) with tolerance 2e-2 instead of 2e-5.

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
    /// Decode outputs y = o W_O against single-process MLA decoding (fp32) over the same cache (in bf16, the same
    /// rounded values): max over steps of the relative error.
    public var differenceFromMLA: Double
    /// The checks' tolerance: 2e-5 in fp32, 2e-2 in bf16.
    public var tolerance: Double
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
            if config.precision == .bf16 { try OneDNN.require() }
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
        let cache = try handoff(proj, transform: r, config: config, comm: comm)
        // Read before the timing's all-reduce below, which is no part of the handoff.
        let handoffSent = comm.counters.bytesSent
        let allPositions = (0..<ranks).map { config.layout.positions(rank: $0, ranks: ranks, length: promptLength) }
        let counts = allPositions.map(\.count)
        let handoffS = try comm.allReduce([SystemInfo.now() - t], op: .max)[0]
        let handoffBytes = try comm.allGather([handoffSent]).map { $0[0] }

        // The reference (rank 0): the untransformed whole cache, gathered outside the timed steps.
        let plain = LatentAttention.concatenate(proj.c.matrix, proj.kr.matrix)
        let gathered = Tensor(uninitialized: [promptLength * (dc + dr)])
        try comm.allGatherV(UnsafeBufferPointer(plain.buffer), into: gathered.buffer, counts: counts.map { $0 * (dc + dr) })
        let reference = Tensor(zeros: rank == 0 ? [promptLength + config.steps, dc + dr] : [0, dc + dr])
        if rank == 0 { place(gathered, into: reference, rowWidth: dc + dr, positions: allPositions) }
        let bf16 = config.precision == .bf16
        if bf16 { reference.roundToBF16() }

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
            cache.write(row: position, column: 0, latentRow.pointer, count: cols.count)
            cache.write(row: position, column: cols.count, p.kr.pointer, count: dr)
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
                if bf16 { BF16.roundInPlace(reference.pointer + position * (dc + dr), dc + dr) }
                let mla = LatentShard(cache: LatentCache(reference.rows(0..<(position + 1)), precision: .fp32),
                                      queries: LatentShard.queryRows(qLatent: qc, qRope: qr, transform: nil, cols: 0..<dc, heads: 0..<hN),
                                      heads: 0..<hN, latentCols: dc, wUV: w.wUV).attend(vDim: dv, scale: config.scale)
                difference = max(difference, relativeError(w.output(o), w.output(mla).toArray().map(Double.init)))
            }
        }

        // The prefill against one process (rank 0 recomputes every token's projections and runs the kernel once).
        var prefillError = -1.0
        let out = Tensor(uninitialized: [1, n, hN, dv])
        for i in 0..<(n * hN) { (out.pointer + i * dv).update(from: prefill.o.pointer + i * kd, count: dv) }
        if bf16 { out.roundToBF16() }  // the prefill's output as a bf16 run stores it
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
        let cacheBytes = try comm.allGather([cache.bytes]).map { $0[0] }
        let tolerance = bf16 ? 2e-2 : 2e-5
        let passed: Bool? = config.check ? verdict[1] <= tolerance && (config.algorithm == .tpla || verdict[0] <= tolerance) : nil
        let sorted = steps.sorted()
        let report = DecodeReport(
            algorithm: config.algorithm, backend: backend, ranks: ranks, config: config, prefillS: prefillS, handoffS: handoffS,
            handoffBytesSent: handoffBytes, stepS: KernelBench.median(steps), stepMinS: sorted.first ?? 0, stepMaxS: sorted.last ?? 0,
            cacheBytes: cacheBytes, stepBytesSent: stepCounters.bytesSent, stepCollectives: stepCounters.collectives,
            stepMessages: stepCounters.messagesSent, prefillError: verdict[1] < 0 ? nil : verdict[1], differenceFromMLA: verdict[0], tolerance: tolerance, passed: passed)
        if passed == false {
            throw SeqParError.checkFailed(String(format: "prefill error %.2e against one process (tolerance %.0e)%@", verdict[1], tolerance,
                                                 config.algorithm == .tpla ? "" : String(format: ", decode %.2e against MLA (tolerance %.0e)", verdict[0], tolerance)))
        }
        return report
    }

    /// Rows arrive in rank order, each rank's in its positions' order: puts each at its global position.
    static func place(_ received: Tensor, into target: Tensor, rowWidth: Int, positions: [[Int]]) {
        place(UnsafePointer(received.pointer), into: target.pointer, rowWidth: rowWidth, positions: positions)
    }

    /// The same on raw rows of any element type (fp32 or bf16 bits).
    static func place<T>(_ received: UnsafePointer<T>, into target: UnsafeMutablePointer<T>, rowWidth: Int, positions: [[Int]]) {
        var offset = 0
        for rankPositions in positions {
            for p in rankPositions {
                (target + p * rowWidth).update(from: received + offset * rowWidth, count: rowWidth)
                offset += 1
            }
        }
    }

    /// The handoff: this rank's prefilled rows (projections `p`) into its decode cache, (L + steps) x (its latent
    /// columns + d_r), rows in global order, in `config.precision`: TPLA, one all-to-all of [c R[:, slice_g] | k_r];
    /// TP-MLA, one all-gather. In bf16 the rows are rounded before they travel and travel as UInt16 (half the bytes).
    public static func handoff(_ p: Projected, transform r: Tensor?, config: DecodeConfig, comm: some Communicator) throws -> LatentCache {
        let (rank, ranks) = (comm.rank, comm.size)
        let (dc, dr, promptLength, n) = (config.latentDim, config.ropeDim, config.promptLength, p.c.shape[0])
        let tpla = config.algorithm == .tpla
        let cols = LatentShard.split(config.algorithm, heads: config.heads, latentDim: dc, rank: rank, ranks: ranks).cols
        let width = cols.count + dr
        let cache = LatentCache(rows: promptLength + config.steps, cols: width, precision: config.precision)
        let counts = config.layout.counts(ranks: ranks, length: promptLength)
        let allPositions = (0..<ranks).map { config.layout.positions(rank: $0, ranks: ranks, length: promptLength) }
        let transformed = LatentShard.columns(p.c.matrix, transform: r, cols: 0..<dc)
        // The rows this rank sends: TPLA, for each rank g its slice [c R[:, slice_g] | k_r] of every local row (rank g
        // receives every row of its slice); TP-MLA (or MLA on one rank), [c R | k_r] once, for every rank.
        let send: Tensor
        if tpla {
            send = Tensor(uninitialized: [ranks * n * width])
            for g in 0..<ranks {
                for i in 0..<n {
                    let dst = send.pointer + (g * n + i) * width
                    dst.update(from: transformed.pointer + i * dc + g * cols.count, count: cols.count)
                    (dst + cols.count).update(from: p.kr.pointer + i * dr, count: dr)
                }
            }
        } else {
            send = withExtendedLifetime(transformed) { LatentAttention.concatenate(transformed.matrix, p.kr.matrix) }
        }
        func exchange<T: CommElement>(_ payload: UnsafeBufferPointer<T>, into target: UnsafeMutablePointer<T>) throws {
            let received = UnsafeMutableBufferPointer<T>.allocate(capacity: promptLength * width)
            defer { received.deallocate() }
            if tpla {
                try comm.allToAllV(payload, counts: Array(repeating: n * width, count: ranks), into: received, counts: counts.map { $0 * width })
            } else {
                try comm.allGatherV(payload, into: received, counts: counts.map { $0 * width })
            }
            place(UnsafePointer(received.baseAddress!), into: target, rowWidth: width, positions: allPositions)
        }
        if config.precision == .bf16 {
            let packed = BF16Buffer(capacity: send.count)
            send.convertToBF16(packed.base)
            try exchange(UnsafeBufferPointer(start: packed.base, count: send.count), into: cache.bf16.base)
        } else {
            try exchange(UnsafeBufferPointer(send.buffer), into: cache.matrix.base)
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
        var options = AttentionOptions(causal: true, layout: c.layout, scale: c.scale)
        options.precision = c.precision
        for h in 0..<hN {
            BLAS.gemm(p.c.matrix, Matrix(base: w.wUK.pointer + h * dc * dn, rows: dc, cols: dn),
                      into: Matrix(base: k.pointer + h * kd, rows: n, cols: dn, ld: hN * kd))
            BLAS.gemm(p.c.matrix, Matrix(base: w.wUV.pointer + h * dc * dv, rows: dc, cols: dv),
                      into: Matrix(base: v.pointer + h * kd, rows: n, cols: dv, ld: hN * kd))
            for i in 0..<n { (k.pointer + (i * hN + h) * kd + dn).update(from: p.kr.pointer + i * dr, count: dr) }
        }
        return LocalAttention(shape: AttentionShape(seqLen: c.promptLength, heads: hN, headDim: kd),
                              options: options, positions: positions,
                              q: p.q.reshaped([1, n, hN, kd]), k: k, v: v)
    }
}
