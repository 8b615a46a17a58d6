// The blockwise softmax-attention kernel in bf16, FlashAttention's mixed precision: the same tiles, visible counts and
// online softmax as the fp32 kernel (SoftmaxAttention.swift), with every product on oneDNN's bf16 matmul.
//
// bf16: Q, K, V, dO as the products read them (each head converted once per call into contiguous bf16 scratch; a bf16
// run's tensors already hold bf16 values, so this conversion is exact there), P (rounded after the fp32 exponentials,
// for P V and P^T dO) and dS (for dS K and dS^T Q). fp32: the scores S and dP, the running max and sum, lse, the
// softmax gradient, and every accumulator (O across key tiles, dQ, dK, dV), which the products add into directly.
// The kernel leaves its fp32 results as they are: whoever holds the final O, dQ, dK, dV rounds them (a ring merges
// partial outputs in fp32 first; see AttentionRun).
// The softmax pass is fused per row: max, the scaled exponentials, their fp32 sum and the bf16 store of P in one sweep
// of the score row, which stays in cache between the product that wrote it and the product that reads P.

import Foundation
import Synchronization

extension SoftmaxAttention {
    /// bf16 scratch for one call: converted heads and the P (or dS) tile.
    final class BF16Scratch {
        let q = BF16Buffer(), k = BF16Buffer(), v = BF16Buffer(), gradOut = BF16Buffer()
        let p = BF16Buffer(capacity: tileRows * tileCols), ds = BF16Buffer(capacity: tileRows * tileCols)
        let scores = UnsafeMutablePointer<Float>.allocate(capacity: tileRows * tileCols)
        let dp = UnsafeMutablePointer<Float>.allocate(capacity: tileRows * tileCols)
        let rowMax = UnsafeMutablePointer<Float>.allocate(capacity: maxTileRows), rowSum = UnsafeMutablePointer<Float>.allocate(capacity: maxTileRows)
        /// A profiled forward's row maxima of the tile in hand (`KernelProfile.maxNanoseconds`).
        let tileMax = UnsafeMutablePointer<Float>.allocate(capacity: maxTileRows)
        /// fp32 accumulators the products add into, contiguous (`FloatBuffer`): a query tile's O or dQ, a kv head's dK and dV.
        let accumulator = FloatBuffer(), gradK = FloatBuffer(), gradV = FloatBuffer()
        let dnn: OneDNN.Context
        /// The kv head whose K and V the buffers hold (GQA: consecutive query heads share it).
        var kvHead: (batch: Int, head: Int)? = nil
        var kvConverted: (k: BF16Matrix, v: BF16Matrix)? = nil

        /// Packed tiles (`OneDNN.Context.pack`) of the kv head in hand, by operand and first key, and their buffers.
        var packed: [PackedTile: OneDNN.PackedMatrix?] = [:]
        var packBuffers: [BF16Buffer] = [], packBuffersUsed = 0

        /// Which operand a packed tile holds: K^T (S = Q K^T), V (O += P V), V^T (dP = dO V^T), K (dQ += dS K).
        enum Operand { case keyTransposed, value, valueTransposed, key }
        struct PackedTile: Hashable { let operand: Operand; let start: Int }

        /// Forgets the packed tiles (a new kv head); their buffers are reused.
        func resetPacks() { packed.removeAll(keepingCapacity: true); packBuffersUsed = 0 }

        /// The kv head whose tiles `packed` holds.
        var packsFor: (batch: Int, head: Int)? = nil

        /// Packed tiles for kv head (b, g) from here on: those of another head are forgotten.
        func usePacks(batch b: Int, head g: Int) {
            if packsFor.map({ $0 != (b, g) }) ?? true { resetPacks(); packsFor = (b, g) }
        }

        /// Whether to pack: $SEQPAR_BF16_PACK=off multiplies plain operands throughout (to measure one against the other).
        static let packing = ProcessInfo.processInfo.environment["SEQPAR_BF16_PACK"] != "off"

        /// Whether packing a kv head's full key tiles pays: when at least 16 query tiles read each (`queryRows` rows
        /// of each of `group` query heads). oneDNN's reorder into the packed layout costs about what one product with
        /// a plain operand loses against a packed one, so it pays back only over many query tiles. Measured on the AMX
        /// device, one core, H=4, D=128, packed over plain in back-to-back pairs (benchmarks/results/bf16/run-pack):
        /// L=4096 (32 query tiles) forward 1.04-1.44x, backward 0.84-1.37x (medians 1.1x); L=2048 (16) full forward
        /// 1.10-1.53x, causal about even; L=1024 (8) 0.6-1.1x, a loss. A 16-rank ring at L=16384 (1024 queries a
        /// rank) therefore multiplies plain operands.
        static func packPays(queryRows: Int, group: Int) -> Bool {
            packing && queryRows * group >= 16 * tileRows
        }

        /// `tile` (rows j0 ..< j0 + tile.rows of K or V) packed as `operand` reads it, once per kv head; nil where
        /// oneDNN has no packed layout for it.
        func packed(_ operand: Operand, _ tile: BF16Matrix, start j0: Int) -> OneDNN.PackedMatrix? {
            let id = PackedTile(operand: operand, start: j0)
            if let p = packed[id] { return p }
            if packBuffersUsed == packBuffers.count { packBuffers.append(BF16Buffer()) }
            let buffer = packBuffers[packBuffersUsed]
            let transposed = operand == .keyTransposed || operand == .valueTransposed
            let p = dnn.pack(tile, transposeB: transposed, into: buffer)
            if p != nil { packBuffersUsed += 1 }
            packed[id] = p
            return p
        }

        /// c = a * op(tile) (or c += with `accumulate`), op(tile) being `operand` of the key tile at `j0` (K^T and V^T
        /// read transposed): packed once per kv head where `pack` asks and oneDNN has a packed matmul for it, else
        /// the plain tile.
        func product(_ a: BF16Matrix, _ operand: Operand, _ tile: BF16Matrix, start j0: Int, pack: Bool, into c: Matrix, accumulate: Bool = false) {
            if pack, let packedTile = packed(operand, tile, start: j0), dnn.gemm(a, packed: packedTile, into: c, accumulate: accumulate) { return }
            dnn.gemm(a, tile, transposeB: operand == .keyTransposed || operand == .valueTransposed, into: c, accumulate: accumulate)
        }

        init() {
            guard let c = try? OneDNN.context() else {
                preconditionFailure("a bf16 kernel ran without oneDNN: call OneDNN.require() before bf16 work (it throws the error that says what to install)")
            }
            dnn = c
        }
        deinit { scores.deallocate(); dp.deallocate(); rowMax.deallocate(); rowSum.deallocate(); tileMax.deallocate() }

        /// K and V of kv head (b, g) in bf16, contiguous: views of contiguous bf16 heads; strided bf16 heads copied and fp32
        /// ones converted, on a change of head only.
        /// Tried on AMX (benchmarks/results/bf16/run-b519c4b): K^T converted once per head, so that S = Q K^T reads plain
        /// row-major operands, and P^T, dS^T written out for dV and dK instead of oneDNN's transposed source: neither was
        /// faster (the forward half as fast, the backward 10-20% slower, on a host whose bf16 baseline itself moved
        /// between 250 and 450 GFLOP/s across those runs), so oneDNN reads the transposes itself.
        func kv(_ k: BF16Operand, _ v: BF16Operand, batch b: Int, head g: Int) -> (k: BF16Matrix, v: BF16Matrix) {
            switch (k, v) {
            case (.heads, .heads): return (k.head(batch: b, g, buffer: self.k), v.head(batch: b, g, buffer: self.v))
            case (.bf16(let kt), .bf16(let vt)) where kt.head(batch: b, g).isContiguous && vt.head(batch: b, g).isContiguous:
                return (kt.head(batch: b, g), vt.head(batch: b, g))
            default: break
            }
            if let converted = kvConverted, kvHead.map({ $0 == (b, g) }) ?? false { return converted }
            let converted = (k.head(batch: b, g, buffer: self.k), v.head(batch: b, g, buffer: self.v))
            (kvHead, kvConverted) = ((b, g), converted)
            return converted
        }
    }

    /// The bf16 kernel on operands already in bf16 (a bf16 ring's q, converted once per pass, and its K/V blocks as they
    /// arrive): `forward(..., precision: .bf16)` on their values, without converting them again. q (B, Cq, H, D),
    /// k and v (B, Ck, G, D); o and lse in fp32.
    public static func forward(q: BF16Tensor, qPositions: [Int], k: BF16Tensor, v: BF16Tensor, kPositions: [Int],
                               causal: Bool, documents: Documents? = nil, scale: Float, progress: () -> Void = {}) -> AttentionOutput {
        precondition(q.shape[2] % k.shape[2] == 0 && qPositions.count == q.shape[1] && kPositions.count == k.shape[1] && v.shape == k.shape)
        let out = AttentionOutput(o: Tensor(zeros: [q.shape[0], q.shape[1], q.shape[2], v.shape[3]]), lse: Tensor(zeros: [q.shape[0], q.shape[2], q.shape[1]]))
        forwardBF16(q: .bf16(q), k: .bf16(k), v: .bf16(v), windows: windows(qPositions, kPositions, causal: causal, documents: documents), scale: scale, into: out, progress: progress)
        return out
    }

    /// The same, extending `acc`: (o, lse) of these queries over other keys (lse -inf where a row has seen none) become
    /// those over both key sets, as `LSEMerge.merge(into: acc, forward(...))` would make them, without a block result
    /// to allocate and merge. The online softmax starts from each row's previous result: running max = lse, running
    /// sum = 1, output = o (its exponentials are relative to lse, so they sum to 1). Ring attention's forward step.
    public static func forward(q: BF16Tensor, qPositions: [Int], k: BF16Tensor, v: BF16Tensor, kPositions: [Int],
                               causal: Bool, documents: Documents? = nil, scale: Float, extending acc: AttentionOutput, progress: () -> Void = {}) {
        forward(q: .bf16(q), qPositions: qPositions, k: .bf16(k), v: .bf16(v), kPositions: kPositions, causal: causal, documents: documents,
                scale: scale, extending: acc, progress: progress)
    }

    /// The same on operands in either storage order (`BF16Operand`; the ring's are head-major).
    static func forward(q: BF16Operand, qPositions: [Int], k: BF16Operand, v: BF16Operand, kPositions: [Int],
                        causal: Bool, documents: Documents?, scale: Float, extending acc: AttentionOutput, progress: () -> Void) {
        let (qs, ks) = (q.shape, k.shape)
        precondition(qs[2] % ks[2] == 0 && qPositions.count == qs[1] && kPositions.count == ks[1] && v.shape == ks)
        precondition(acc.o.shape == [qs[0], qs[1], qs[2], v.shape[3]] && acc.lse.shape == [qs[0], qs[2], qs[1]])
        forwardBF16(q: q, k: k, v: v, windows: windows(qPositions, kPositions, causal: causal, documents: documents), scale: scale,
                    into: acc, extending: true, progress: progress)
    }

    /// The bf16 backward on operands already in bf16, adding into `grads` (`backward(..., adding:)`); `gradOut` is dO in
    /// fp32 (for the row sums of dO * O) and `gradOutBF16` the same values in bf16 (for the products).
    public static func backward(q: BF16Tensor, qPositions: [Int], k: BF16Tensor, v: BF16Tensor, kPositions: [Int],
                                output: AttentionOutput, gradOut: Tensor, gradOutBF16: BF16Tensor, causal: Bool, documents: Documents? = nil, scale: Float,
                                adding grads: AttentionGradients, work: Range<Double> = 0..<1, progress: () -> Void = {}) {
        backward(q: .bf16(q), qPositions: qPositions, k: .bf16(k), v: .bf16(v), kPositions: kPositions, output: output, gradOut: gradOut,
                 gradOutBF16: .bf16(gradOutBF16), causal: causal, documents: documents, scale: scale, adding: grads, work: work, progress: progress)
    }

    /// The same on operands in either storage order (`BF16Operand`; the ring's are head-major).
    static func backward(q: BF16Operand, qPositions: [Int], k: BF16Operand, v: BF16Operand, kPositions: [Int], output: AttentionOutput,
                         gradOut: Tensor, gradOutBF16: BF16Operand, causal: Bool, documents: Documents?, scale: Float,
                         adding grads: AttentionGradients, work: Range<Double>, progress: () -> Void) {
        let qs = q.shape
        precondition(gradOut.shape == qs && gradOutBF16.shape == qs && output.o.shape == qs && kPositions.count == k.shape[1])
        precondition(grads.dq.shape == qs && grads.dk.shape == k.shape && grads.dv.shape == v.shape)
        backwardBF16(q: q, k: k, v: v, windows: windows(qPositions, kPositions, causal: causal, documents: documents), output: output,
                     gradOut: gradOut, gradOutBF16: gradOutBF16, scale: scale, adding: grads, work: work, progress: progress)
    }

    /// Key tiles over `start ..< reach`: `tileCols` wide, and a shorter last one split into a multiple of 64 and a
    /// remainder under 64. Each width is a oneDNN primitive to create (and cache): a decode step, whose cache grows by
    /// one key, would otherwise ask for a new width every step; this way there are at most 8 + 63 of them.
    /// Wider key tiles were tried on AMX (2048 forward, 1024 backward, interleaved with 512 over three rounds on one
    /// loan): no difference the host's drift did not swamp, so the scratch stays at 512.
    static func bf16KeyTiles(_ start: Int, _ reach: Int) -> [(Int, Int)] {
        var tiles: [(Int, Int)] = []
        var j0 = start
        while j0 < reach {
            let rest = reach - j0
            let width = rest >= tileCols ? tileCols : (rest > 64 && rest % 64 != 0 ? rest - rest % 64 : rest)
            tiles.append((j0, j0 + width))
            j0 += width
        }
        return tiles
    }

    /// Where the bf16 kernel reads its operands, head by head: fp32 tensors converted into the scratch (a head at a
    /// time), or tensors already in bf16, read in place (a ring's K/V blocks arrive in bf16; its q and dO are converted
    /// once per pass rather than once per step).
    enum BF16Operand {
        case fp32(Tensor)
        /// (B, C, H, D), as the fp32 tensors are.
        case bf16(BF16Tensor)
        /// (B, H, C, D): head-major (`BF16Tensor(roundingHeadMajor:)`), every head contiguous; the ring's q, dO and K/V
        /// blocks, so that no head is copied at each step.
        case heads(BF16Tensor)

        /// (B, C, H, D) whatever the storage order.
        var shape: [Int] {
            switch self {
            case .fp32(let t): t.shape
            case .bf16(let t): t.shape
            case .heads(let t): [t.shape[0], t.shape[2], t.shape[1], t.shape[3]]
            }
        }

        /// The same values with every head contiguous (`.heads`, or a tensor of one head): fp32 rounded, strided bf16
        /// heads copied; as it is where that holds already.
        func headMajor() -> BF16Operand {
            switch self {
            case .heads: return self
            case .bf16(let t) where t.shape[2] == 1: return self
            case .fp32(let t): return .heads(BF16Tensor(roundingHeadMajor: t))
            case .bf16(let t):
                let (batch, seq, heads, dim) = (t.shape[0], t.shape[1], t.shape[2], t.shape[3])
                let out = BF16Tensor(uninitialized: [batch, heads, seq, dim])
                for b in 0..<batch {
                    for h in 0..<heads {
                        let m = t.head(batch: b, h)
                        _ = m.copy(into: out.pointer + (b * heads + h) * seq * dim)
                    }
                }
                return .heads(out)
            }
        }

        /// Head (b, h) as a contiguous bf16 matrix: a view where the head is one already (a tensor of one head), else
        /// copied or converted into `buffer`.
        /// The products read contiguous heads: a head of a (B, C, H, D) tensor has rows H * D apart, 2 KiB at H=8, D=128
        /// in bf16, and oneDNN's AMX kernels read such rows several times slower (their loads of 16 rows fall into
        /// the same few cache sets). Copying each head once, a few hundred KiB, made the 16-rank ring's bf16 forward
        /// 1.2-1.5x faster on the AMX device (benchmarks/results/bf16/run-9588fbc).
        func head(batch b: Int, _ h: Int, buffer: BF16Buffer) -> BF16Matrix {
            switch self {
            case .bf16(let t):
                let m = t.head(batch: b, h)
                return m.isContiguous ? m : m.copy(into: buffer.reserve(m.rows * m.cols))
            case .heads(let t):
                let (heads, seq, dim) = (t.shape[1], t.shape[2], t.shape[3])
                return BF16Matrix(base: t.pointer + (b * heads + h) * seq * dim, rows: seq, cols: dim)
            case .fp32(let t):
                let m = t.head(batch: b, h)
                return BF16.convert(m, into: buffer.reserve(m.rows * m.cols))
            }
        }
    }

    /// Threads the bf16 forward shares its query tiles among, in each rank (`--threads`; 1: the calling thread alone).
    /// The tiles are handed out one group at a time, as threads free up, so that a slower core takes fewer: on a
    /// host whose cores run at different speeds, a rank's threads even out what equal shares between ranks cannot.
    nonisolated(unsafe) public static var threads = 1

    static func forwardBF16(q: BF16Operand, k: BF16Operand, v: BF16Operand, windows: KeyWindows, scale: Float, into out: AttentionOutput,
                            extending: Bool = false, threads: Int = SoftmaxAttention.threads, progress: () -> Void) {
        let (batch, cq, heads) = (q.shape[0], q.shape[1], q.shape[2])
        let group = heads / k.shape[2]
        let tiles = queryTiles(windows)
        // Units of work: a few query tiles of one head, in head order (consecutive units share K and V), segment by
        // segment (`segments`: the documents of a packed sequence, whose heads are done one document at a time).
        let threads = max(1, min(threads, batch * heads * tiles.count))
        let perUnit = threads > 1 ? max(1, tiles.count * batch * heads / (threads * 8)) : tiles.count
        var units: [(batch: Int, head: Int, tiles: Range<Int>, pack: Bool)] = []
        let segments = segments(tiles.map { ($0.start, $0.reach) })
        for segment in segments {
            let rows = tiles[segment.upperBound - 1].i1 - tiles[segment.lowerBound].i0
            let pack = BF16Scratch.packPays(queryRows: rows / threads, group: group)
            for b in 0..<batch {
                for h in 0..<heads {
                    for t0 in stride(from: segment.lowerBound, to: segment.upperBound, by: perUnit) {
                        units.append((b, h, t0..<min(t0 + perUnit, segment.upperBound), pack))
                    }
                }
            }
        }
        // Several threads, or several segments, read every head of q, K and V more than once: head-major copies first,
        // where a head is not a view already.
        let (q, k, v) = threads > 1 || segments.count > 1 ? (q.headMajor(), k.headMajor(), v.headMajor()) : (q, k, v)
        /// Takes units until none is left; `progress` after each (the calling thread's only: MPI calls stay on it).
        func work(next: () -> Int?, progress: () -> Void) {
            let scratch = BF16Scratch()
            while let u = next() {
                let (b, h, range, pack) = units[u]
                let qb = q.head(batch: b, h, buffer: scratch.q)
                let (kb, vb) = scratch.kv(k, v, batch: b, head: h / group)
                scratch.usePacks(batch: b, head: h / group)
                forwardBF16(q: qb, k: kb, v: vb, tiles: tiles[range], windows: windows, scale: scale, into: out.o.head(batch: b, h),
                            lse: out.lse.pointer + (b * heads + h) * cq, extending: extending, pack: pack, scratch: scratch, progress: progress)
            }
        }
        shareOut(units.count, threads: threads, progress: progress, work)
    }

    /// Runs `work` on the calling thread and on `threads - 1` helpers until `count` units are taken (each asks
    /// `next` for one), and returns when all are done. Only the calling thread gets `progress` (MPI calls stay on it).
    static func shareOut(_ count: Int, threads: Int, progress: () -> Void, _ work: (_ next: () -> Int?, _ progress: () -> Void) -> Void) {
        let counter = WorkCounter(count)
        withoutActuallyEscaping(work) { work in
            withoutActuallyEscaping(progress) { progress in
                let helpers = DispatchGroup()
                let shared = UncheckedSendable(work)
                for _ in 1..<max(threads, 1) {
                    DispatchQueue.global(qos: .userInitiated).async(group: helpers) { shared.value(counter.next, {}) }
                }
                work(counter.next, progress)
                helpers.wait()
            }
        }
    }

    /// Consecutive tiles grouped where their keys overlap: a new group starts at a tile whose keys all lie past those
    /// of the tiles before it (the next document of a packed sequence). One group without documents. The kernels
    /// run group by group, every head of one before the next, so that a document's queries, keys and gradient
    /// accumulators stay in cache together: a packed sequence of nine documents in 65536 tokens spent 1.6x
    /// (forward) and 1.5x (backward) the per-document runs' time outside products and softmax passes, head by head
    /// over the whole block (benchmarks/results/documents-usp/run-segments).
    static func segments(_ spans: [(start: Int, reach: Int)]) -> [Range<Int>] {
        var groups: [Range<Int>] = []
        var (first, reach) = (0, Int.min)
        for (t, span) in spans.enumerated() {
            if t > first && span.start >= reach {
                groups.append(first..<t)
                first = t
            }
            reach = max(reach, span.reach)
        }
        if first < spans.count { groups.append(first..<spans.count) }
        return groups
    }

    /// The query tiles of a call (`queryTile`), each with the keys its rows see: (i0, i1, start, reach).
    static func queryTiles(_ windows: KeyWindows) -> [(i0: Int, i1: Int, start: Int, reach: Int)] {
        var tiles: [(i0: Int, i1: Int, start: Int, reach: Int)] = []
        var i0 = 0
        while i0 < windows.count {
            let (i1, start, reach) = queryTile(from: i0, windows: windows)
            tiles.append((i0, i1, start, reach))
            i0 = i1
        }
        return tiles
    }

    /// One head, bf16 operands (contiguous), fp32 `o` (any leading dimension; every row written) and lse: the fp32
    /// kernel's tiles. A query tile's output accumulates in contiguous scratch and is written to `o` when the tile is done.
    /// `extending`: o and lse hold a previous result over other keys, which this one extends (`forward(..., extending:)`).
    /// `pack`: full key tiles are packed (`BF16Scratch.packed`) once per kv head, for all the query tiles that read them.
    static func forwardBF16(q qh: BF16Matrix, k kg: BF16Matrix, v vg: BF16Matrix, tiles: ArraySlice<(i0: Int, i1: Int, start: Int, reach: Int)>,
                            windows: KeyWindows, scale: Float, into oh: Matrix, lse lseRow: UnsafeMutablePointer<Float>, extending: Bool = false,
                            pack: Bool = false, scratch: BF16Scratch, progress: () -> Void) {
        let dv = vg.cols
        let scores = scratch.scores
        let p = scratch.p.base
        let acc = scratch.accumulator.reserve(maxTileRows * dv)
        for (i0, i1, start, reach) in tiles {
            let rows = i1 - i0
            for i in 0..<rows {
                let previous = extending ? lseRow[i0 + i] : -.infinity
                scratch.rowMax[i] = previous
                scratch.rowSum[i] = previous == -.infinity ? 0 : 1
                if previous == -.infinity { (acc + i * dv).update(repeating: 0, count: dv) } else { (acc + i * dv).update(from: oh.base + (i0 + i) * oh.ld, count: dv) }
            }
            let accM = Matrix(base: acc, rows: rows, cols: dv)
            for (j0, j1) in bf16KeyTiles(start, reach) {
                let width = j1 - j0
                let s = Matrix(base: scores, rows: rows, cols: width)
                KernelProfile.countScores(rows * width)
                let packTile = pack && width == tileCols
                scratch.product(qh.rows(i0..<i1), .keyTransposed, kg.rows(j0..<j1), start: j0, pack: packTile, into: s)
                let softmaxStarted = KernelProfile.softmaxStart()
                // Profiled: every row's max in a sweep of its own, timed apart; unprofiled, each row's max comes in the
                // same sweep as its exponentials.
                let maxSwept = softmaxStarted != 0
                if maxSwept {
                    for i in 0..<rows {
                        let (a, b) = segment(windows, row: i0 + i, tile: j0, width: width)
                        if a < b { scratch.tileMax[i] = VectorMath.max(scores + i * width + a, b - a) }
                    }
                    KernelProfile.maxEnd(softmaxStarted)
                }
                for i in 0..<rows {
                    let row = scores + i * width, prow = p + i * width
                    let (a, b) = segment(windows, row: i0 + i, tile: j0, width: width)
                    if a == b { prow.update(repeating: 0, count: width); continue }
                    // Scores are unscaled here: the scale (positive) goes into the exponent, max(scale s) = scale max(s).
                    let newMax = max(scratch.rowMax[i], scale * (maxSwept ? scratch.tileMax[i] : VectorMath.max(row + a, b - a)))
                    let sum = VectorMath.expToBF16(row + a, b - a, scale: scale, subtract: newMax, into: prow + a)
                    prow.update(repeating: 0, count: a)
                    (prow + b).update(repeating: 0, count: width - b)
                    absorb(sum: sum, max: newMax, row: i, scratch.rowMax, scratch.rowSum, output: acc + i * dv, dv)
                }
                KernelProfile.softmaxEnd(softmaxStarted)
                scratch.product(BF16Matrix(base: p, rows: rows, cols: width), .value, vg.rows(j0..<j1), start: j0, pack: packTile,
                                into: accM, accumulate: true)
            }
            finish(rows: i0..<i1, scratch.rowMax, scratch.rowSum, accumulator: accM, output: oh, lse: lseRow)
            progress()
        }
    }

    /// The bf16 backward of `backward(..., adding:)`: same tiles and work shares, fp32 accumulators added into.
    /// `gradOut` (fp32) gives the row sums of dO * O; `gradOutBF16`, where given, is the same dO in bf16 for the products.
    static func backwardBF16(q: BF16Operand, k: BF16Operand, v: BF16Operand, windows: KeyWindows, output: AttentionOutput, gradOut dO: Tensor,
                             gradOutBF16: BF16Operand? = nil, scale: Float, adding grads: AttentionGradients, work: Range<Double>,
                             threads: Int = SoftmaxAttention.threads, progress: () -> Void) {
        let (batch, cq, heads, dim) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3])
        let group = heads / k.shape[2]
        // Heads with no work in this share are left out before anything is converted. Units of work: the query heads
        // of one kv head (whose dK and dV they add to), handed to `threads` threads as they free up.
        // Segment by segment (`segments`: the documents of a packed sequence), so that a document's dK and dV
        // accumulators, its keys' rows only, stay in cache while its queries add to them.
        let share = backwardShare(batch: batch, heads: heads, windows: windows, work: work)
        var kvUnits: [(batch: Int, kvHead: Int, keys: Range<Int>, pack: Bool, heads: [(batch: Int, head: Int, tiles: [BackwardTile])])] = []
        let tiles = queryTiles(windows)
        let segments = segments(tiles.map { ($0.start, $0.reach) })
        for segment in segments {
            let rows = tiles[segment.lowerBound].i0..<tiles[segment.upperBound - 1].i1
            // Full key tiles are packed once per kv head for the query tiles that read them, where they are many.
            let (pack, firstUnit) = (BF16Scratch.packPays(queryRows: rows.count, group: group), kvUnits.count)
            for entry in share {
                let tiles = entry.tiles.filter { rows.contains($0.i0) }
                guard let first = tiles.first else { continue }
                let keys = tiles.reduce(first.start..<first.reach) { min($0.lowerBound, $1.start)..<max($0.upperBound, $1.reach) }
                let unit = (batch: entry.batch, head: entry.head, tiles: tiles)
                // The query heads of one kv head are consecutive in `share`.
                if kvUnits.count > firstUnit, let last = kvUnits.last, last.batch == entry.batch, last.kvHead == entry.head / group {
                    kvUnits[kvUnits.count - 1].heads.append(unit)
                    kvUnits[kvUnits.count - 1].keys = min(last.keys.lowerBound, keys.lowerBound)..<max(last.keys.upperBound, keys.upperBound)
                } else {
                    kvUnits.append((entry.batch, entry.head / group, keys, pack, [unit]))
                }
            }
        }
        let threads = max(1, min(threads, kvUnits.count))
        // As in the forward: heads read more than once are made contiguous once.
        let shared = threads > 1 || segments.count > 1
        let (q, k, v) = shared ? (q.headMajor(), k.headMajor(), v.headMajor()) : (q, k, v)
        let dOperand = shared ? (gradOutBF16 ?? .fp32(dO)).headMajor() : gradOutBF16 ?? .fp32(dO)
        func compute(next: () -> Int?, progress: () -> Void) {
            let scratch = BF16Scratch()
            var rowDot = [Float](repeating: 0, count: tileRows)
            let (p, ds) = (scratch.p.base, scratch.ds.base)
            // The products add into contiguous fp32 scratch (see `BF16Operand.head` for why), and the scratch into the
            // gradients: a query tile's dQ when the tile is done, a kv head's dK and dV when its heads are done.
            let (ck, dkCols, dvCols) = (k.shape[1], grads.dk.shape[3], grads.dv.shape[3])
            let dqTile = scratch.accumulator.reserve(tileRows * dim)
            let (dkAcc, dvAcc) = (Matrix(base: scratch.gradK.reserve(ck * dkCols), rows: ck, cols: dkCols),
                                  Matrix(base: scratch.gradV.reserve(ck * dvCols), rows: ck, cols: dvCols))
            while let n = next() {
                let (b, g, keys, pack) = (kvUnits[n].batch, kvUnits[n].kvHead, kvUnits[n].keys, kvUnits[n].pack)
                scratch.resetPacks()
                (dkAcc.base + keys.lowerBound * dkCols).update(repeating: 0, count: keys.count * dkCols)
                (dvAcc.base + keys.lowerBound * dvCols).update(repeating: 0, count: keys.count * dvCols)
                for unit in kvUnits[n].heads {
                    backwardHead(unit, pack: pack)
                }
                add(dkAcc.rows(keys), into: grads.dk.head(batch: b, g).rows(keys))
                add(dvAcc.rows(keys), into: grads.dv.head(batch: b, g).rows(keys))
            }

            func backwardHead(_ unit: (batch: Int, head: Int, tiles: [BackwardTile]), pack: Bool) {
                let (b, h, g) = (unit.batch, unit.head, unit.head / group)
                let (oh, doh) = (output.o.head(batch: b, h), dO.head(batch: b, h))
                let qb = q.head(batch: b, h, buffer: scratch.q)
                let dob = dOperand.head(batch: b, h, buffer: scratch.gradOut)
                let (kb, vb) = scratch.kv(k, v, batch: b, head: g)
                let dqh = grads.dq.head(batch: b, h)
                let lseRow = output.lse.pointer + (b * heads + h) * cq
                for (i0, rows, start, reach) in unit.tiles {
                    let i1 = i0 + rows
                    for i in i0..<i1 { rowDot[i - i0] = VectorMath.dot(doh.base + i * doh.ld, oh.base + i * oh.ld, dim) }
                    let dq = Matrix(base: dqTile, rows: rows, cols: dim)
                    dqTile.update(repeating: 0, count: rows * dim)
                    for (j0, j1) in bf16KeyTiles(start, reach) {
                        let width = j1 - j0
                        let sm = Matrix(base: scratch.scores, rows: rows, cols: width), dpm = Matrix(base: scratch.dp, rows: rows, cols: width)
                        let (kTile, vTile) = (kb.rows(j0..<j1), vb.rows(j0..<j1))
                        let packTile = pack && width == tileCols
                        scratch.product(qb.rows(i0..<i1), .keyTransposed, kTile, start: j0, pack: packTile, into: sm)
                        scratch.product(dob.rows(i0..<i1), .valueTransposed, vTile, start: j0, pack: packTile, into: dpm)
                        let softmaxStarted = KernelProfile.softmaxStart()
                        for i in 0..<rows {
                            let (a, b) = segment(windows, row: i0 + i, tile: j0, width: width)
                            let (pr, dsr) = (p + i * width, ds + i * width)
                            pr.update(repeating: 0, count: a)
                            dsr.update(repeating: 0, count: a)
                            VectorMath.softmaxGradientBF16(scores: scratch.scores + i * width + a, gradient: scratch.dp + i * width + a, width - a,
                                                           valid: b - a, scale: scale, lse: lseRow[i0 + i], rowDot: rowDot[i],
                                                           probabilities: pr + a, scaledGradient: dsr + a)
                        }
                        KernelProfile.softmaxEnd(softmaxStarted)
                        let pm = BF16Matrix(base: p, rows: rows, cols: width), dsm = BF16Matrix(base: ds, rows: rows, cols: width)
                        // ds holds scale * P * (dP - rowDot), rounded: dQ += dS K, dK += dS^T Q, dV += P^T dO.
                        scratch.product(dsm, .key, kTile, start: j0, pack: packTile, into: dq, accumulate: true)
                        scratch.dnn.gemm(dsm, transposeA: true, qb.rows(i0..<i1), into: dkAcc.rows(j0..<j1), accumulate: true)
                        scratch.dnn.gemm(pm, transposeA: true, dob.rows(i0..<i1), into: dvAcc.rows(j0..<j1), accumulate: true)
                    }
                    add(dq, into: dqh.rows(i0..<i1))
                    progress()
                }
            }
        }
        shareOut(kvUnits.count, threads: threads, progress: progress, compute)
    }

    /// `dst += src`, row by row (same shape, any leading dimensions).
    static func add(_ src: Matrix, into dst: Matrix) {
        precondition(src.rows == dst.rows && src.cols == dst.cols)
        for i in 0..<src.rows { VectorMath.update(dst.base + i * dst.ld, with: src.base + i * src.ld, src.cols) { $0 + $1 } }
    }
}

extension VectorMath {
    static let log2e: Float = 1.44269504088896341

    /// 2^x for x <= 0 (a softmax exponent in base 2; a rounding's worth above 0 is fine): x = n + r with |r| <= 1/2
    /// and a degree-5 polynomial for 2^r, relative error under 6e-6, 0 below -126 (-inf included). For the bf16 kernels,
    /// whose P is rounded to 2^-9 next: with the scale and log2(e) folded into one multiply and no range split, about
    /// 1.7x the fp32 kernels' `exp` (measured on the dev machine: 0.9 against 1.6 ns an element). Its multiply-adds are
    /// fused where the CPU has FMA (`multiplyAdd`).
    @inline(__always)
    static func exp2NonPositive(_ x: V) -> V {
        let lower: Float = -126
        let xc = x.replacing(with: lower, where: x .< lower)
        let magic = V(repeating: 12582912)  // 1.5 * 2^23: rounds to an integer, kept in the low mantissa bits
        let t = xc + magic
        let r = xc - (t - magic)
        var p = V(repeating: 1.3333558e-3)
        p = multiplyAdd(p, r, V(repeating: 9.6181291e-3))
        p = multiplyAdd(p, r, V(repeating: 5.5504109e-2))
        p = multiplyAdd(p, r, V(repeating: 2.4022651e-1))
        p = multiplyAdd(p, r, V(repeating: 6.9314718e-1))
        p = multiplyAdd(p, r, V(repeating: 1))
        let scale = unsafeBitCast(((unsafeBitCast(t, to: SIMD16<Int32>.self) &- 0x4B40_0000) &+ 127) &<< 23, to: V.self)
        return (p * scale).replacing(with: 0, where: x .< lower)
    }

    /// `dst[j] = bf16(exp(a * p[j] - b))` for j < n; returns the sum of the fp32 exponentials (before rounding, as
    /// FlashAttention sums them). `p` is read only. Exponentials through `exp2NonPositive`: a * p[j] <= b.
    @inline(__always)
    public static func expToBF16(_ p: UnsafePointer<Float>, _ n: Int, scale a: Float, subtract b: Float,
                                 into dst: UnsafeMutablePointer<UInt16>) -> Float {
        KernelProfile.countExp(n)
        var acc = V(repeating: 0)
        var i = 0
        let va = V(repeating: a * log2e), vb = V(repeating: b * log2e)
        while i + 16 <= n {
            let e = exp2NonPositive(multiplyAdd(UnsafeRawPointer(p + i).loadUnaligned(as: V.self), va, -vb))
            UnsafeMutableRawPointer(dst + i).storeBytes(of: BF16.roundFinite(bits: unsafeBitCast(e, to: SIMD16<UInt32>.self)), as: SIMD16<UInt16>.self)
            acc += e
            i += 16
        }
        if i < n {
            var tail = V(repeating: -.infinity)
            for j in 0..<(n - i) { tail[j] = multiplyAdd(p[i + j], va[0], -vb[0]) }
            let e = exp2NonPositive(tail)
            let r = BF16.roundFinite(bits: unsafeBitCast(e, to: SIMD16<UInt32>.self))
            for j in 0..<(n - i) { dst[i + j] = r[j] }
            acc += e
        }
        return horizontalSum(acc)
    }

    /// One row of the bf16 backward: P = exp(scale s - lse) on the first `valid` of `n` scores (0 beyond), stored as
    /// bf16; dS = scale * P * (dP - rowDot) in fp32, stored as bf16 (the scale folded in, so dS K needs none).
    @inline(__always)
    static func softmaxGradientBF16(scores s: UnsafePointer<Float>, gradient g: UnsafePointer<Float>, _ n: Int, valid: Int,
                                    scale: Float, lse: Float, rowDot: Float,
                                    probabilities pOut: UnsafeMutablePointer<UInt16>, scaledGradient dsOut: UnsafeMutablePointer<UInt16>) {
        if valid > 0 { KernelProfile.countExp(valid) }
        let (va, vd) = (V(repeating: scale), V(repeating: rowDot))
        let (va2, vl2) = (V(repeating: scale * log2e), V(repeating: lse * log2e))
        /// Lanes `i ..< i + 16` from loaded scores and gradients; the masked lanes' scores are -inf (P = 0 exactly).
        @inline(__always) func lanes(_ sv: V, _ gv: V) -> (p: SIMD16<UInt16>, ds: SIMD16<UInt16>) {
            let pv = exp2NonPositive(multiplyAdd(sv, va2, -vl2))
            return (BF16.roundFinite(bits: unsafeBitCast(pv, to: SIMD16<UInt32>.self)),
                    BF16.roundFinite(bits: unsafeBitCast(pv * (gv - vd) * va, to: SIMD16<UInt32>.self)))
        }
        var i = 0
        while i + 16 <= valid {
            let r = lanes(UnsafeRawPointer(s + i).loadUnaligned(as: V.self), UnsafeRawPointer(g + i).loadUnaligned(as: V.self))
            UnsafeMutableRawPointer(pOut + i).storeBytes(of: r.p, as: SIMD16<UInt16>.self)
            UnsafeMutableRawPointer(dsOut + i).storeBytes(of: r.ds, as: SIMD16<UInt16>.self)
            i += 16
        }
        if i < valid {
            var sv = V(repeating: -.infinity), gv = V(repeating: 0)
            for j in 0..<(valid - i) { sv[j] = s[i + j]; gv[j] = g[i + j] }
            let r = lanes(sv, gv)
            for j in 0..<(valid - i) { pOut[i + j] = r.p[j]; dsOut[i + j] = r.ds[j] }
            i = valid
        }
        // Keys past the row's last visible one: P = 0, dS = 0.
        if i < n { (pOut + i).update(repeating: 0, count: n - i); (dsOut + i).update(repeating: 0, count: n - i) }
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Hands out indices 0 ..< count, each once, to whichever thread asks next.
final class WorkCounter: Sendable {
    let count: Int
    let taken = Atomic<Int>(0)
    init(_ count: Int) { self.count = count }
    func next() -> Int? {
        let u = taken.wrappingAdd(1, ordering: .relaxed).oldValue
        return u < count ? u : nil
    }
}

/// A value handed to other threads where the compiler cannot see that they use it safely (the bf16 forward's
/// helpers write disjoint rows of its output, and their caller waits for them).
struct UncheckedSendable<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}
