// Prefill -> decode handoff for an MLA layer (`seqpar decode`), as every rank runs it.
//
// Model (random weights from the seed, the same on every rank; d = model width):
//   c = x W_DKV (d_c),  k_r = RoPE(x W_KR) (d_r),  [q_nope | q_r] = x W_Q per head (d_n + d_r, q_r RoPE'd),
//   prefill (decompressed): k_h = [c W_UK,h | k_r], v_h = c W_UV,h, causal softmax attention with scale
//   1/sqrt(d_n + d_r);  decode (absorbed): q_c,h = W_UK,h q_nope,h, then MLA over the latent cache (LatentAttention).
// 1. Prefill: the prompt's L tokens sequence-sharded (`layout`), ring attention on the decompressed heads (exact).
//    Values are zero-padded to the key width when d_v < d_n + d_r (the padding columns come out 0 and are dropped).
// 2. Handoff: each rank's cache rows c R (R the transform; PCA from the all-reduced second moment c^T c) and k_r go
//    to their decode layout in one collective: TPLA, an all-to-all (rank g gets [c R[:, slice_g] | k_r] of every
//    row); TP-MLA, an all-gather (every rank keeps the whole cache).
// 3. Decode: T steps; step t's token (hidden state from the seed, position L + t) is projected on every rank, its
//    latent slice and RoPE key appended to the local cache, and one TPLA (or TP-MLA) step runs: one all-reduce (or
//    AllGather) of the (H, d_v) output, then the layer's output y = o W_O. Nothing else travels.
// The reference is single-process MLA decoding over the same cache (exact), on rank 0.
// Precision bf16 (DecodeRun): the prefill's kernel in bf16, the handoff's payloads and the decode cache in packed bf16
// (2 bytes an element: the cache each rank holds and reads per step halves), the step's all-reduce in fp32.
import Foundation

public struct DecodeConfig: Codable, Sendable, Equatable {
    public var algorithm: LatentAlgorithm = .tpla
    public var promptLength = 4096
    public var steps = 16
    public var modelDim = 1024
    public var heads = 16
    public var latentDim = 512
    public var ropeDim = 64
    public var nopeDim = 128
    public var vDim = 128
    public var transform: LatentTransform = .none
    /// fp32 or bf16 (the prefill's kernel in bf16; the handoff's payloads and the decode cache packed bf16; scores,
    /// softmax and outputs fp32: DecodeRun's file comment).
    public var precision: Precision = .fp32
    public var layout: SequenceLayout = .zigzag
    public var seed: UInt64 = 0
    public var check = false
    /// A directory with W_DKV.npy ... W_O.npy: the sizes come from them (otherwise weights come from the seed).
    public var weightsDirectory: String?

    public init() {}

    public var attentionShape: AttentionShape { AttentionShape(seqLen: promptLength, heads: heads, headDim: nopeDim + ropeDim) }
    public var scale: Float { 1 / Float(nopeDim + ropeDim).squareRoot() }

    public func validate(ranks: Int) throws {
        for (name, value) in [("prompt-len", promptLength), ("steps", steps), ("model-dim", modelDim), ("heads", heads),
                              ("latent-dim", latentDim), ("nope-dim", nopeDim), ("v-dim", vDim)] where value < 1 {
            throw SeqParError.invalidInput("--\(name) is \(value); it must be at least 1")
        }
        guard ropeDim >= 2 && ropeDim % 2 == 0 else {
            throw SeqParError.invalidInput("--rope-dim \(ropeDim): RoPE rotates pairs of dimensions, so it must be even and at least 2")
        }
        guard vDim <= nopeDim + ropeDim else {
            throw SeqParError.invalidInput("--v-dim \(vDim) is wider than the keys (--nope-dim + --rope-dim = \(nopeDim + ropeDim)): the prefill's ring attention carries values at the key width; lower --v-dim")
        }
        try algorithm.validate(ranks: ranks, shape: LatentShape(seqLen: promptLength, heads: heads, latentDim: latentDim, ropeDim: ropeDim, vDim: vDim))
        if transform == .hadamard { _ = try transform.matrix(latentDim: latentDim) }
    }
}

/// The layer's weights: seeded, or read from a directory of .npy files named after them.
public struct MLAWeights: @unchecked Sendable {
    /// W_DKV (d, d_c), W_KR (d, d_r), W_Q (d, H (d_n + d_r)), W_UK (H, d_c, d_n), W_UV (H, d_c, d_v), W_O (H d_v, d).
    public var wDKV: Tensor, wKR: Tensor, wQ: Tensor, wUK: Tensor, wUV: Tensor, wO: Tensor

    public static let fileNames = ["W_DKV", "W_KR", "W_Q", "W_UK", "W_UV", "W_O"]

    /// Reads DIR/W_DKV.npy ... DIR/W_O.npy; returns them with `config`'s sizes set from their shapes, or throws naming
    /// the file whose shape disagrees.
    public static func read(directory: String, into config: inout DecodeConfig) throws -> MLAWeights {
        let t = try fileNames.map { try NPY.read(directory + "/" + $0 + ".npy") }
        for (i, rank) in [2, 2, 2, 3, 3, 2].enumerated() where t[i].rank != rank {
            throw SeqParError.invalidInput("\(directory)/\(fileNames[i]).npy has shape \(t[i].shape); it must have \(rank) dimensions (see seqpar decode --help)")
        }
        let (d, dc, dr, h) = (t[0].shape[0], t[0].shape[1], t[1].shape[1], t[3].shape[0])
        let dn = t[3].shape[2], dv = t[4].shape[2]
        let expected = [[d, dc], [d, dr], [d, h * (dn + dr)], [h, dc, dn], [h, dc, dv], [h * dv, d]]
        for i in 1..<6 where t[i].shape != expected[i] {
            throw SeqParError.invalidInput("\(directory)/\(fileNames[i]).npy has shape \(t[i].shape), but the other weights make it \(expected[i]) (d = \(d), d_c = \(dc), d_r = \(dr), H = \(h), d_n = \(dn), d_v = \(dv))")
        }
        (config.modelDim, config.latentDim, config.ropeDim, config.heads, config.nopeDim, config.vDim) = (d, dc, dr, h, dn, dv)
        for (i, w) in t.enumerated() { try w.requireFinite("\(directory)/\(fileNames[i]).npy") }
        return MLAWeights(wDKV: t[0], wKR: t[1], wQ: t[2], wUK: t[3], wUV: t[4], wO: t[5])
    }

    init(wDKV: Tensor, wKR: Tensor, wQ: Tensor, wUK: Tensor, wUV: Tensor, wO: Tensor) {
        (self.wDKV, self.wKR, self.wQ, self.wUK, self.wUV, self.wO) = (wDKV, wKR, wQ, wUK, wUV, wO)
    }

    public init(_ c: DecodeConfig) {
        func w(_ stream: UInt64, _ shape: [Int], fanIn: Int) -> Tensor {
            let rng = CounterRandom(seed: c.seed, stream: 2000 + stream)
            let t = Tensor(uninitialized: shape)
            let s = 1 / Float(fanIn).squareRoot()
            for i in 0..<t.count { t.pointer[i] = rng.normal(i) * s }
            return t
        }
        wDKV = w(0, [c.modelDim, c.latentDim], fanIn: c.modelDim)
        wKR = w(1, [c.modelDim, c.ropeDim], fanIn: c.modelDim)
        wQ = w(2, [c.modelDim, c.heads * (c.nopeDim + c.ropeDim)], fanIn: c.modelDim)
        wUK = w(3, [c.heads, c.latentDim, c.nopeDim], fanIn: c.latentDim)
        wUV = w(4, [c.heads, c.latentDim, c.vDim], fanIn: c.latentDim)
        wO = w(5, [c.heads * c.vDim, c.modelDim], fanIn: c.heads * c.vDim)
    }

    /// The layer's output y = o W_O (1 x d) for one token's o (1, H, d_v).
    func output(_ o: Tensor) -> Tensor {
        let y = Tensor(zeros: [1, wO.shape[1]])
        BLAS.gemm(Matrix(base: o.pointer, rows: 1, cols: o.count), wO.matrix, into: y.matrix)
        return y
    }
}

/// Projections of token rows at `positions`: latent c, RoPE'd k_r, and the per-head queries.
public struct Projected: @unchecked Sendable {
    var c: Tensor       // (n, d_c)
    var kr: Tensor      // (n, d_r)
    var q: Tensor       // (n, H, d_n + d_r), q_r RoPE'd

    init(_ x: Tensor, positions: [Int], weights w: MLAWeights, config c: DecodeConfig) {
        let n = positions.count
        let xm = Matrix(base: x.pointer, rows: n, cols: c.modelDim)
        self.c = Tensor(zeros: [n, c.latentDim])
        kr = Tensor(zeros: [n, c.ropeDim])
        q = Tensor(zeros: [n, c.heads, c.nopeDim + c.ropeDim])
        BLAS.gemm(xm, w.wDKV.matrix, into: self.c.matrix)
        BLAS.gemm(xm, w.wKR.matrix, into: kr.matrix)
        BLAS.gemm(xm, w.wQ.matrix, into: Matrix(base: q.pointer, rows: n, cols: c.heads * (c.nopeDim + c.ropeDim)))
        for (i, p) in positions.enumerated() {
            Self.rope(kr.pointer + i * c.ropeDim, c.ropeDim, position: p)
            for h in 0..<c.heads { Self.rope(q.pointer + (i * c.heads + h) * (c.nopeDim + c.ropeDim) + c.nopeDim, c.ropeDim, position: p) }
        }
    }

    /// Rotates pairs (2i, 2i+1) by position * 10000^(-2i/n).
    static func rope(_ p: UnsafeMutablePointer<Float>, _ n: Int, position: Int) {
        for i in 0..<(n / 2) {
            let angle = Double(position) * Foundation.pow(10000, -2 * Double(i) / Double(n))
            let (cs, sn) = (Float(Foundation.cos(angle)), Float(Foundation.sin(angle)))
            let (a, b) = (p[2 * i], p[2 * i + 1])
            p[2 * i] = a * cs - b * sn
            p[2 * i + 1] = a * sn + b * cs
        }
    }

    /// Absorbed latent queries q_c,h = W_UK,h q_nope,h for each row and head: (n, H, d_c).
    func absorbed(_ w: MLAWeights, _ c: DecodeConfig) -> Tensor {
        let n = q.shape[0]
        let out = Tensor(zeros: [n, c.heads, c.latentDim])
        let width = c.nopeDim + c.ropeDim
        for h in 0..<c.heads {
            let qn = Matrix(base: q.pointer + h * width, rows: n, cols: c.nopeDim, ld: c.heads * width)
            let wuk = Matrix(base: w.wUK.pointer + h * c.latentDim * c.nopeDim, rows: c.latentDim, cols: c.nopeDim)
            BLAS.gemm(qn, wuk, transposeB: true, into: Matrix(base: out.pointer + h * c.latentDim, rows: n, cols: c.latentDim, ld: c.heads * c.latentDim))
        }
        return out
    }

    /// RoPE queries (n, H, d_r), copied out of q.
    func ropeQueries(_ c: DecodeConfig) -> Tensor {
        let n = q.shape[0], width = c.nopeDim + c.ropeDim
        let out = Tensor(uninitialized: [n, c.heads, c.ropeDim])
        for r in 0..<(n * c.heads) { (out.pointer + r * c.ropeDim).update(from: q.pointer + r * width + c.nopeDim, count: c.ropeDim) }
        return out
    }
}
