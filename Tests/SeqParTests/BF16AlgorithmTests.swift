// Every softmax algorithm in bf16 end to end on the in-process cluster (dense at 1 rank; allgather, ring, rsa, ulysses
// at 1-4 ranks): causal and not, GQA, both layouts, lengths that do not divide, forward and backward. Inputs are
// rounded to bf16 as a bf16 run rounds them, o is rounded before the backward pass reads it and the gradients after,
// and each of o, dq, dk, dv (every rank's slice and the gathered tensor) must stay within FlashAttention's rule:
// at most 2x the plain bf16 reference's error against the Double oracle on the same rounded inputs, plus 1e-4.
// Also: the bf16 wire carries half the K/V bytes of fp32; the whole-matrix oracles agree with the naive ones; a
// bf16 run of `AttentionRun` checks with the rule, reports it, and refuses inputs that overflow bf16.
import Foundation
import Testing
@testable import SeqPar

/// The oracle and the plain bf16 reference of one problem, on its rounded global inputs (computed once per problem).
final class BF16References: @unchecked Sendable {
    struct Entry {
        var oracle: DenseOracle.Forward, oracleGradients: DenseOracle.Gradients
        var plainO: [Double], plainGradients: DenseOracle.Gradients
    }
    static let shared = BF16References()
    private let lock = NSLock()
    private var entries: [String: Entry] = [:]

    func entry(_ s: AttentionShape, causal: Bool, seed: UInt64, scale: Float) -> Entry {
        let key = "\(s) \(causal) \(seed) \(scale)"
        lock.lock()
        if let e = entries[key] { lock.unlock(); return e }
        lock.unlock()
        let all = Array(0..<s.seqLen)
        let g = SeededInputs.attention(shape: s, options: AttentionOptions(), positions: all, seed: seed)
        let dO = SeededInputs.gradOut(shape: s, positions: all, seed: seed)
        for t in [g.q, g.k, g.v, dO] { t.roundToBF16() }
        let e = Entry(oracle: DenseOracle.forward(q: g.q, k: g.k, v: g.v, causal: causal, scale: Double(scale)),
                      oracleGradients: DenseOracle.backward(q: g.q, k: g.k, v: g.v, gradOut: dO, causal: causal, scale: Double(scale)),
                      plainO: PlainBF16Attention.forward(q: g.q, k: g.k, v: g.v, causal: causal, scale: scale),
                      plainGradients: PlainBF16Attention.backward(q: g.q, k: g.k, v: g.v, gradOut: dO, causal: causal, scale: scale))
        lock.lock(); entries[key] = e; lock.unlock()
        return e
    }
}

/// The error of plain values (bf16 values held in Double) against the oracle.
func plainError(_ plain: [Double], _ oracle: [Double]) -> Double {
    plain.map(Float.init).withUnsafeBufferPointer { relativeError($0, oracle[...]) }
}

/// Runs `algorithm` forward and backward on every rank as a bf16 run does: inputs rounded, o rounded before backward
/// reads it, gradients rounded; every rank also gathers the outputs in global order.
func runBF16OnCluster(_ algorithm: any AttentionAlgorithm, ranks: Int, shape s: AttentionShape, options: AttentionOptions,
                      seed: UInt64, dropSaved: Bool = false) throws -> [RankResult] {
    try InProcessCluster.run(ranks: ranks, timeout: 60) { comm -> RankResult in
        let positions = options.partition.positions(rank: comm.rank, ranks: comm.size, length: s.seqLen)
        let x = SeededInputs.attention(shape: s, options: options, positions: positions, seed: seed)
        let dO = SeededInputs.gradOut(shape: s, positions: positions, seed: seed)
        for t in [x.q, x.k, x.v, dO] { t.roundToBF16() }
        comm.resetCounters()
        let out = try algorithm.forward(x, comm: comm)
        let fwd = comm.counters
        out.o.roundToBF16()
        comm.resetCounters()
        let grads = try algorithm.backward(x, output: dropSaved ? AttentionOutput(o: out.o, lse: out.lse) : out, gradOut: dO, comm: comm)
        let bwd = comm.counters
        for t in [grads.dq, grads.dk, grads.dv] { t.roundToBF16() }
        let layout = options.partition
        let gathered = (try layout.gather(out.o, length: s.seqLen, comm: comm), try layout.gather(grads.dq, length: s.seqLen, comm: comm),
                        try layout.gather(grads.dk, length: s.seqLen, comm: comm), try layout.gather(grads.dv, length: s.seqLen, comm: comm))
        return RankResult(positions: positions, o: out.o, lse: out.lse, grads: grads, gathered: gathered, counters: (fwd, bwd))
    }
}

/// Runs `c` in bf16 and checks every rank's slices and the gathered o, dq, dk, dv under the bf16 rule, and lse.
@discardableResult
func checkBF16Attention(_ c: AttentionCase) throws -> [(forward: CommCounters, backward: CommCounters)] {
    let s = c.shape
    var options = AttentionOptions(causal: c.causal, layout: c.layout)
    options.precision = .bf16
    let scale = options.effectiveScale(headDim: s.headDim)
    let ref = BF16References.shared.entry(s, causal: c.causal, seed: c.seed, scale: scale)
    let results = try runBF16OnCluster(c.algorithm.implementation, ranks: c.ranks, shape: s, options: options, seed: c.seed, dropSaved: c.dropSaved)
    let expected = [("o", ref.oracle.o, ref.plainO), ("dq", ref.oracleGradients.dq, ref.plainGradients.dq),
                    ("dk", ref.oracleGradients.dk, ref.plainGradients.dk), ("dv", ref.oracleGradients.dv, ref.plainGradients.dv)]
    let bounds = expected.map { PlainBF16Attention.bound(referenceError: plainError($0.2, $0.1)) }
    let qRow = s.heads * s.headDim, kvRow = s.kvHeads * s.headDim
    for r in results {
        // Each rank's slice, relative to the oracle's max magnitude over the whole tensor, within the global bound.
        for (i, t) in [r.o, r.grads.dq, r.grads.dk, r.grads.dv].enumerated() {
            let full = expected[i].1
            let scaleOf = max(full.map(abs).max()!, Double.leastNormalMagnitude)
            let mine = rowsAt(full, batch: s.batch, length: s.seqLen, row: i < 2 ? qRow : kvRow, positions: r.positions)
            var worst = 0.0
            for (a, e) in zip(t.buffer, mine) { let d = abs(Double(a) - e); worst = d.isNaN ? .infinity : max(worst, d) }
            #expect(t.count == mine.count && worst / scaleOf <= bounds[i], "\(c) bf16: a rank's slice of \(expected[i].0): \(worst / scaleOf), bound \(bounds[i])")
        }
        for b in 0..<s.batch {
            for h in 0..<s.heads {
                for (i, p) in r.positions.enumerated() {
                    let e = ref.oracle.lse[(b * s.heads + h) * s.seqLen + p], a = Double(r.lse.pointer[(b * s.heads + h) * r.positions.count + i])
                    #expect(abs(a - e) <= AttentionRun.bf16LSETolerance * max(1, abs(e)), "\(c) bf16: lse at b\(b) h\(h) t\(p): \(a) vs \(e)")
                }
            }
        }
    }
    let g = results[0].gathered
    for (i, t) in [g.o, g.dq, g.dk, g.dv].enumerated() {
        let error = relativeError(t, expected[i].1)
        #expect(error <= bounds[i], "\(c) bf16: gathered \(expected[i].0) error \(error), plain bf16 \(plainError(expected[i].2, expected[i].1)), bound \(bounds[i])")
        #expect(t.buffer.allSatisfy { BF16.rounded($0) == $0 }, "\(c) bf16: \(expected[i].0) holds bf16 values")
    }
    return results.map(\.counters)
}

@Suite(.enabled(if: OneDNN.isAvailable, "oneDNN (libdnnl) is not installed")) struct BF16AlgorithmTests {
    static let distributed: [AlgorithmName] = [.allgather, .ring, .rsa, .ulysses]

    /// GQA shapes every algorithm runs at `ranks`, of a length no rank count divides evenly (Ulysses: 2P heads over P).
    static func shape(_ algorithm: AlgorithmName, ranks: Int, seqLen: Int = 43, headDim: Int = 16) -> AttentionShape {
        algorithm == .ulysses ? AttentionShape(seqLen: seqLen, heads: 2 * ranks, kvHeads: ranks, headDim: headDim)
                              : AttentionShape(seqLen: seqLen, heads: 4, kvHeads: 2, headDim: headDim)
    }

    @Test(arguments: [false, true]) func denseOnOneRank(causal: Bool) throws {
        try checkBF16Attention(AttentionCase(algorithm: .dense, ranks: 1, shape: AttentionShape(seqLen: 70, heads: 4, kvHeads: 2, headDim: 32), causal: causal))
    }

    /// Every distributed algorithm at 1-4 ranks, causal and not, contiguous and zigzag.
    @Test(arguments: [1, 2, 3, 4], distributed) func distributedMeetsTheBF16Rule(ranks: Int, algorithm: AlgorithmName) throws {
        for causal in [false, true] {
            for layout in SequenceLayout.allCases {
                try checkBF16Attention(AttentionCase(algorithm: algorithm, ranks: ranks, shape: Self.shape(algorithm, ranks: ranks), causal: causal, layout: layout))
            }
        }
    }

    /// Batch 2 and D = 32, and RSA recomputing its probabilities from lse (nothing kept from forward).
    @Test(arguments: distributed) func batchAndWiderHeads(algorithm: AlgorithmName) throws {
        var s = Self.shape(algorithm, ranks: 3, seqLen: 64, headDim: 32)
        s.batch = 2
        if algorithm == .ulysses { s = AttentionShape(batch: 2, seqLen: 64, heads: 6, kvHeads: 3, headDim: 32) }
        try checkBF16Attention(AttentionCase(algorithm: algorithm, ranks: 3, shape: s, causal: true, layout: .zigzag, seed: 11))
        if algorithm == .rsa {
            try checkBF16Attention(AttentionCase(algorithm: .rsa, ranks: 3, shape: s, causal: true, layout: .zigzag, seed: 11, dropSaved: true))
        }
    }

    /// The same run in fp32 and in bf16: the K/V a bf16 run sends are half the bytes, and what stays fp32 (ring's and
    /// RSA's dK/dV accumulators, allgather's reduce-scatter, Ulysses' lse and gradients) is unchanged.
    @Test(arguments: distributed) func bf16HalvesTheKVBytes(algorithm: AlgorithmName) throws {
        let ranks = 3
        let s = Self.shape(algorithm, ranks: ranks, seqLen: 50)
        func counters(_ precision: Precision) throws -> [(forward: CommCounters, backward: CommCounters)] {
            var o = AttentionOptions(causal: true, layout: .zigzag)
            o.precision = precision
            return try runBF16OnCluster(algorithm.implementation, ranks: ranks, shape: s, options: o, seed: 5).map(\.counters)
        }
        let (fp32, bf16) = (try counters(.fp32), try counters(.bf16))
        let counts = SequenceLayout.zigzag.counts(ranks: ranks, length: s.seqLen)
        for r in 0..<ranks {
            let (f, b) = (fp32[r], bf16[r])
            #expect(f.forward.bytesSent > 0 && f.backward.bytesSent > 0)
            #expect(b.forward.messagesSent == f.forward.messagesSent && b.forward.collectives == f.forward.collectives, "\(algorithm) rank \(r): same messages")
            #expect(b.backward.messagesSent == f.backward.messagesSent && b.backward.collectives == f.backward.collectives, "\(algorithm) rank \(r): same messages")
            switch algorithm {
            case .ring, .rsa, .allgather:
                // Forward: K and V only (ring: packed blocks; RSA: a K ring and a V ring; allgather: two gathers).
                // Backward: the same K/V traffic again, plus what stays fp32: the dK/dV accumulators (ring, RSA) or
                // the reduce-scatter of dK and dV (allgather).
                #expect(2 * b.forward.bytesSent == f.forward.bytesSent && 2 * b.forward.bytesReceived == f.forward.bytesReceived, "\(algorithm) rank \(r)")
                #expect(b.backward.bytesSent == f.backward.bytesSent - f.forward.bytesSent / 2
                        && b.backward.bytesReceived == f.backward.bytesReceived - f.forward.bytesReceived / 2, "\(algorithm) rank \(r)")
            case .ulysses:
                // Forward: q, k, v and o in bf16, lse (one fp32 per query head and token, sent back to its owner) in fp32.
                let lse = 4 * s.batch * (s.seqLen - counts[r]) * (s.heads / ranks)
                #expect(2 * (b.forward.bytesSent - lse) == f.forward.bytesSent - lse, "rank \(r): \(b.forward.bytesSent) vs \(f.forward.bytesSent)")
            default: break
            }
        }
        if algorithm == .ulysses {
            // The exchange of q, k, v alone: exactly half.
            let sums = try InProcessCluster.run(ranks: ranks) { comm -> [Int] in
                var o = AttentionOptions(causal: true, layout: .zigzag)
                let positions = o.partition.positions(rank: comm.rank, ranks: ranks, length: s.seqLen)
                let x = SeededInputs.attention(shape: s, options: o, positions: positions, seed: 5)
                let split = UlyssesAttention.HeadSplit(ranks: ranks, shape: s), local = split.localShape(s)
                var bytes: [Int] = []
                for bf16 in [false, true] {
                    o.precision = bf16 ? .bf16 : .fp32
                    let outs = [Tensor(zeros: local.qShape(tokens: s.seqLen)), Tensor(zeros: local.kvShape(tokens: s.seqLen)), Tensor(zeros: local.kvShape(tokens: s.seqLen))]
                    comm.resetCounters()
                    try UlyssesAttention.exchange([.init(tensor: x.q, heads: split.queryHeads, bf16: bf16), .init(tensor: x.k, heads: split.kvHeads, bf16: bf16),
                                                   .init(tensor: x.v, heads: split.kvHeads, bf16: bf16)], toHeads: true, outputs: outs, x: x, comm: comm)
                    bytes.append(comm.counters.bytesSent)
                }
                return bytes
            }
            for b in sums { #expect(b[0] > 0 && b[0] == 2 * b[1], "\(b)") }
        }
    }

    /// The bf16 gather: the same tensor as the fp32 gather of the rounded parts, in half the bytes.
    @Test func bf16GatherMatchesTheRoundedFP32Gather() throws {
        let s = AttentionShape(batch: 2, seqLen: 23, heads: 3, headDim: 5)
        let results = try InProcessCluster.run(ranks: 3) { comm -> (Bool, Int, Int) in
            let positions = SequenceLayout.zigzag.positions(rank: comm.rank, ranks: 3, length: s.seqLen)
            let local = SeededInputs.tensor(.k, seed: 2, batch: s.batch, length: s.seqLen, heads: s.heads, dim: s.headDim, positions: positions)
            comm.resetCounters()
            let b = try SequenceLayout.zigzag.gather(local, length: s.seqLen, comm: comm, as: .bf16)
            let bf16Bytes = comm.counters.bytesReceived
            local.roundToBF16()
            comm.resetCounters()
            let f = try SequenceLayout.zigzag.gather(local, length: s.seqLen, comm: comm)
            return (b.shape == f.shape && b.toArray() == f.toArray(), bf16Bytes, comm.counters.bytesReceived)
        }
        for (same, bf16, fp32) in results { #expect(same && 2 * bf16 == fp32) }
    }

    /// An fp32 run of every algorithm is unchanged by the bf16 paths: two runs give the same bits, and the fp32
    /// wire still carries fp32 (the in-process cluster checks element kinds: a bf16 message would not match).
    @Test(arguments: distributed) func fp32RunsStayFP32(algorithm: AlgorithmName) throws {
        let s = Self.shape(algorithm, ranks: 2, seqLen: 31)
        let a = try runOnCluster(algorithm.implementation, ranks: 2, shape: s, options: AttentionOptions(causal: true, layout: .zigzag), seed: 3)
        try checkAttention(AttentionCase(algorithm: algorithm, ranks: 2, shape: s, causal: true, layout: .zigzag, seed: 3))
        let b = try runOnCluster(algorithm.implementation, ranks: 2, shape: s, options: AttentionOptions(causal: true, layout: .zigzag), seed: 3)
        for (x, y) in zip(a, b) {
            #expect(x.o.toArray() == y.o.toArray() && x.grads.dk.toArray() == y.grads.dk.toArray())
            #expect(x.counters.forward.bytesSent == y.counters.forward.bytesSent)
        }
    }
}

@Suite struct MatrixOracleTests {
    /// The whole-matrix oracles against the naive ones: the Double oracle to rounding noise; the plain bf16 reference
    /// equal but for rare one-step differences at bf16 rounding boundaries (the Double sums run in another order).
    @Test(arguments: [false, true]) func matchesTheNaiveOracles(causal: Bool) throws {
        let s = AttentionShape(batch: 2, seqLen: 37, heads: 4, kvHeads: 2, headDim: 8)
        let all = Array(0..<s.seqLen)
        let g = SeededInputs.attention(shape: s, options: AttentionOptions(), positions: all, seed: 9)
        let dO = SeededInputs.gradOut(shape: s, positions: all, seed: 9)
        for t in [g.q, g.k, g.v, dO] { t.roundToBF16() }
        let scale: Float = 0.3
        let (naive, naiveG) = (DenseOracle.forward(q: g.q, k: g.k, v: g.v, causal: causal, scale: Double(scale)),
                               DenseOracle.backward(q: g.q, k: g.k, v: g.v, gradOut: dO, causal: causal, scale: Double(scale)))
        let (fast, fastG) = (MatrixOracle.forward(q: g.q, k: g.k, v: g.v, causal: causal, scale: Double(scale)),
                             MatrixOracle.backward(q: g.q, k: g.k, v: g.v, gradOut: dO, causal: causal, scale: Double(scale)))
        func close(_ a: [Double], _ b: [Double], _ tol: Double) -> Bool {
            let m = b.map(abs).max() ?? 1
            return a.count == b.count && zip(a, b).allSatisfy { abs($0 - $1) <= tol * m }
        }
        #expect(close(fast.o, naive.o, 1e-12) && close(fast.lse, naive.lse, 1e-12))
        #expect(close(fastG.dq, naiveG.dq, 1e-12) && close(fastG.dk, naiveG.dk, 1e-12) && close(fastG.dv, naiveG.dv, 1e-12))
        // With packed documents (fp32 runs of 1024 tokens or more are checked against MatrixOracle too).
        let docs = try Documents(lengths: [10, 1, 20, 6], seqLen: 37)
        let (naiveD, naiveDG) = (DenseOracle.forward(q: g.q, k: g.k, v: g.v, causal: causal, documents: docs, scale: Double(scale)),
                                 DenseOracle.backward(q: g.q, k: g.k, v: g.v, gradOut: dO, causal: causal, documents: docs, scale: Double(scale)))
        let (fastD, fastDG) = (MatrixOracle.forward(q: g.q, k: g.k, v: g.v, causal: causal, documents: docs, scale: Double(scale)),
                               MatrixOracle.backward(q: g.q, k: g.k, v: g.v, gradOut: dO, causal: causal, documents: docs, scale: Double(scale)))
        #expect(close(fastD.o, naiveD.o, 1e-12) && close(fastD.lse, naiveD.lse, 1e-12) && !close(fastD.o, naive.o, 1e-3))
        #expect(close(fastDG.dq, naiveDG.dq, 1e-12) && close(fastDG.dk, naiveDG.dk, 1e-12) && close(fastDG.dv, naiveDG.dv, 1e-12))
        let plainO = PlainBF16Attention.forward(q: g.q, k: g.k, v: g.v, causal: causal, scale: scale)
        let plainG = PlainBF16Attention.backward(q: g.q, k: g.k, v: g.v, gradOut: dO, causal: causal, scale: scale)
        let fastPlainO = MatrixOracle.forward(q: g.q, k: g.k, v: g.v, causal: causal, scale: Double(scale), plainBF16: true).o
        let fastPlainG = MatrixOracle.backward(q: g.q, k: g.k, v: g.v, gradOut: dO, causal: causal, scale: Double(scale), plainBF16: true)
        for (name, a, b, oracle) in [("o", fastPlainO, plainO, naive.o), ("dq", fastPlainG.dq, plainG.dq, naiveG.dq),
                                     ("dk", fastPlainG.dk, plainG.dk, naiveG.dk), ("dv", fastPlainG.dv, plainG.dv, naiveG.dv)] {
            let differing = zip(a, b).filter { $0 != $1 }.count
            #expect(differing <= a.count / 50, "\(name): \(differing) of \(a.count) values differ")
            // A value that differs is one bf16 step away (a relative 2^-7 at most), and the errors agree.
            #expect(zip(a, b).allSatisfy { abs($0 - $1) <= 0x1p-7 * max(abs($0), abs($1)) }, "\(name)")
            let (ea, eb) = (plainError(a, oracle), plainError(b, oracle))
            #expect(abs(ea - eb) <= 0.25 * eb, "\(name): plain errors \(ea) vs \(eb)")
        }
    }
}

@Suite(.enabled(if: OneDNN.isAvailable, "oneDNN (libdnnl) is not installed")) struct BF16RunTests {
    /// `AttentionRun` in bf16: rounded inputs and outputs, the bf16 rule in the check report, for every softmax
    /// algorithm; the same run's outputs are bf16 values.
    @Test(arguments: [AlgorithmName.dense, .allgather, .ring, .rsa, .ulysses]) func runChecksWithTheBF16Rule(algorithm: AlgorithmName) throws {
        let ranks = algorithm == .dense ? 1 : 3
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("seqpar-bf16-run-\(getpid())-\(algorithm)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let reports = try InProcessCluster.run(ranks: ranks) { comm -> AttentionRunReport in
            var c = AttentionRunConfig(algorithm: algorithm, shape: AttentionShape(seqLen: 61, heads: 6, kvHeads: 3, headDim: 16),
                                       options: AttentionOptions(causal: true, layout: algorithm == .dense ? .contiguous : .zigzag))
            c.options.precision = .bf16
            (c.backward, c.check, c.outPath, c.gradsPrefix) = (true, true, dir.appendingPathComponent("o.npy").path, dir.appendingPathComponent("g").path)
            return try AttentionRun.execute(c, comm: comm, backend: "test")
        }
        let r = reports[0]
        let c = try #require(r.check)
        #expect(r.precision == .bf16 && c.precision == .bf16 && c.passed && c.usesBF16Rule)
        #expect(c.forwardError <= c.forwardBound! && c.dqError! <= c.dqBound! && c.dkError! <= c.dkBound! && c.dvError! <= c.dvBound!, "\(AttentionRun.checkSummary(c))")
        #expect(c.plainBF16ForwardError! > 1e-4 && c.plainBF16DqError! > 1e-4, "the plain reference is a bf16 computation: \(AttentionRun.checkSummary(c))")
        #expect(AttentionRun.checkSummary(c).contains("plain bf16") && AttentionRun.checkSummary(c).contains("bound"))
        for name in ["o.npy", "g.dq.npy", "g.dk.npy", "g.dv.npy"] {
            let t = try NPY.read(dir.appendingPathComponent(name).path)
            #expect(t.toArray().allSatisfy { BF16.rounded($0) == $0 }, "\(name) holds bf16 values")
        }
        // The JSON names the precision, both errors and the bound.
        let encoder = JSONEncoder()
        encoder.keyEncodingStrategy = .convertToSnakeCase
        let json = String(decoding: try encoder.encode(r), as: UTF8.self)
        for key in ["\"precision\":\"bf16\"", "plain_bf16_dq_error", "dq_bound", "forward_bound", "lse_tolerance"] { #expect(json.contains(key), "\(key) in \(json)") }
    }

    /// Linear attention in a bf16 run: inputs and outputs rounded, checked against its oracle on the rounded inputs
    /// with the configuration's tolerance.
    @Test func linearRunUsesItsTolerance() throws {
        let reports = try InProcessCluster.run(ranks: 2) { comm -> AttentionRunReport in
            var c = AttentionRunConfig(algorithm: .lasp2, shape: AttentionShape(seqLen: 40, heads: 2, headDim: 8), options: AttentionOptions(causal: true, decay: [0.95]))
            c.options.precision = .bf16
            (c.backward, c.check, c.forwardTolerance, c.gradientTolerance) = (true, true, 2e-2, 2e-2)
            return try AttentionRun.execute(c, comm: comm, backend: "test")
        }
        let c = try #require(reports[0].check)
        #expect(c.passed && c.precision == .bf16 && !c.usesBF16Rule && c.forwardTolerance == 2e-2)
    }

    /// A value that is finite in fp32 but beyond bf16's range is refused on every rank, naming the tensor and index;
    /// a NaN is still reported as a NaN.
    @Test func inputsThatOverflowBF16AreRefused() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("seqpar-bf16-overflow-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let shape = [6, 2, 4]
        let good = (0..<48).map { Float($0 % 5) * 0.1 }
        var big = good, nan = good
        big[3 * 8 + 1 * 4 + 2] = 3.4e38  // token 3, head 1, dim 2: finite in fp32, infinite in bf16
        nan[2 * 8] = .nan
        for (name, values) in [("good", good), ("big", big), ("nan", nan)] {
            try NPY.write(Tensor(shape: shape, values: values), to: dir.appendingPathComponent("\(name).npy").path)
        }
        func run(_ v: String, _ precision: Precision) throws -> [String] {
            try InProcessCluster.run(ranks: 3) { comm -> String in
                var c = AttentionRunConfig(algorithm: .allgather, shape: AttentionShape(seqLen: 6, heads: 2, headDim: 4))
                c.options.precision = precision
                (c.qPath, c.kPath, c.vPath) = (dir.appendingPathComponent("good.npy").path, dir.appendingPathComponent("good.npy").path, dir.appendingPathComponent("\(v).npy").path)
                do { _ = try AttentionRun.execute(c, comm: comm, backend: "test"); return "no error" } catch { return "\(error)" }
            }
        }
        for e in try run("big", .bf16) {
            #expect(e.contains("big.npy holds a value at (batch, token, head, dim) [0, 3, 1, 2] that overflows bf16's range"), "\(e)")
        }
        for e in try run("big", .fp32) { #expect(e == "no error", "fp32 takes 3.4e38: \(e)") }
        for e in try run("nan", .bf16) { #expect(e.contains("nan.npy holds nan at (batch, token, head, dim) [0, 2, 0, 0]"), "\(e)") }
    }
}
