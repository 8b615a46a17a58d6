// LASP-2H: a small hybrid model, a stack of linear-attention layers (L) and softmax-attention layers (S), sequence
// parallel across ranks. Linear layers run LASP-2 (one AllGather of the memory states); softmax layers AllGather K
// and V once and attend their own query chunk with the blockwise kernel (`allgather`), as the LASP-2 paper does for
// the softmax layers of its hybrid models. Every layer is causal (a language model). Packed documents (`documents`):
// no layer crosses a boundary: the linear layers restart their state at each document start (LASP-2's restarts) and
// the softmax layers mask by document (the blockwise kernel's key runs); the Double oracle masks both likewise.
//
// Model width d = H * D. Layer l, with input x (tokens x d), pre-norm as in current language models:
//   n = x / rms(x)  (per token, no gain, rms = sqrt(mean(x^2) + 1e-6)),
//   q = n Wq (H*D), k = n Wk (G*D), v = n Wv (G*D),  o = Attention_l(q, k, v),  y = x + o Wo   (residual)
// The norm keeps every layer's attention input at unit scale however the residual stream grows (unnormalised
// linear attention sums up to L terms, and a softmax layer fed its raw output would saturate).
// Weights are random, the same on every rank: N(0, 1/fan_in) from the seed (stream 1000 + 4 l + {0: Wq, 1: Wk,
// 2: Wv, 3: Wo}), so a run is reproducible from its arguments alone. Backward, given dY: through each layer in
// reverse, dn = dq Wq^T + dk Wk^T + dv Wv^T, dx = dy + (dn - n mean(dn * n)) / rms; the weight gradients
// (n^T dq, ..., o^T dy) are sums over every
// token, so each rank's partial sums are added across ranks with one all-reduce (rank order: deterministic).
// Memory per rank: each layer keeps its input, q, k, v, o for backward (C x (d + 2(H+G)D) floats), plus the
// gathered K, V of one softmax layer at a time (2 L G D floats).
// Precision bf16 (a bf16 model, FlashAttention's rule): the weights hold bf16 values (rounded once, when the stack is
// built, so the Double oracle sees the same weights); every product (the projections, their gradients and the
// attention kernels: LASP-2 for L layers, the blockwise kernel for S layers) has bf16 operands on oneDNN and an fp32
// result; q, k, v, o and dO are rounded to bf16 where they are made (the activations a layer keeps and its attention
// reads). fp32: the residual stream x, y, dx (accumulators), the norm and its gradient, the linear layers' states
// (and their AllGather), and the weight gradients with their all-reduce. The caller rounds the stack's input and its
// final y and dx (HybridRun).

public struct HybridStack: Sendable {
    public enum Layer: Character, Sendable, CaseIterable {
        case linear = "L", softmax = "S"
    }

    public struct Weights: Sendable {
        /// (d, H*D), (d, G*D), (d, G*D), (H*D, d), row-major.
        public var wq: Tensor, wk: Tensor, wv: Tensor, wo: Tensor
        var all: [Tensor] { [wq, wk, wv, wo] }
    }

    public let layers: [Layer]
    public let shape: AttentionShape
    /// Decay and feature map of the linear layers.
    public let linear: AttentionOptions
    public let weights: [Weights]
    /// fp32, or bf16 (see the file comment).
    public let precision: Precision
    /// Packed documents (nil: one): every layer attends within a document only.
    public let documents: Documents?

    public var width: Int { shape.heads * shape.headDim }

    /// Parses a pattern such as "LLLS"; throws naming the bad character.
    public static func layers(_ pattern: String) throws -> [Layer] {
        guard !pattern.isEmpty else { throw SeqParError.invalidInput("--layers is empty: give a pattern of L (linear) and S (softmax) layers, e.g. LLLS") }
        return try pattern.map { c in
            guard let l = Layer(rawValue: Character(c.uppercased())) else {
                throw SeqParError.invalidInput("--layers '\(pattern)': '\(c)' is not a layer; use L (linear attention) and S (softmax attention), e.g. LLLS")
            }
            return l
        }
    }

    /// bf16 needs `OneDNN.require()` to have succeeded before `forward`.
    public init(layers: [Layer], shape: AttentionShape, decay: [Double], featureMap: FeatureMap, seed: UInt64, precision: Precision = .fp32,
                documents: Documents? = nil) {
        self.layers = layers
        self.shape = shape
        self.precision = precision
        self.documents = documents
        var linear = AttentionOptions(causal: true, decay: decay, featureMap: featureMap)
        linear.precision = precision
        linear.documents = documents
        self.linear = linear
        let (d, q, kv) = (shape.heads * shape.headDim, shape.heads * shape.headDim, shape.kvHeads * shape.headDim)
        weights = layers.indices.map { l in
            func w(_ i: UInt64, _ rows: Int, _ cols: Int) -> Tensor {
                let rng = CounterRandom(seed: seed, stream: 1000 + 4 * UInt64(l) + i)
                let t = Tensor(uninitialized: [rows, cols])
                let s = 1 / Float(rows).squareRoot()
                for j in 0..<(rows * cols) { t.pointer[j] = rng.normal(j) * s }
                if precision == .bf16 { t.roundToBF16() }
                return t
            }
            return Weights(wq: w(0, d, q), wk: w(1, d, kv), wv: w(2, d, kv), wo: w(3, q, d))
        }
    }

    func options(_ layer: Layer) -> AttentionOptions {
        if layer == .linear { return linear }
        var o = AttentionOptions(causal: true)
        o.precision = precision
        o.documents = documents
        return o
    }

    /// `c = op(a) op(b)` (`c +=` with `accumulate`): OpenBLAS in fp32; in bf16 both operands rounded to bf16 and
    /// multiplied on oneDNN into the fp32 c.
    func product(_ a: Matrix, transposeA: Bool = false, _ b: Matrix, transposeB: Bool = false, into c: Matrix, accumulate: Bool = false) {
        guard precision == .bf16 else {
            return BLAS.gemm(a, transposeA: transposeA, b, transposeB: transposeB, into: c, beta: accumulate ? 1 : 0)
        }
        guard let dnn = try? OneDNN.context() else {
            preconditionFailure("a bf16 hybrid stack ran without oneDNN: call OneDNN.require() before bf16 work (it throws the error that says what to install)")
        }
        let (ab, bb) = (BF16Buffer(capacity: a.rows * a.cols), BF16Buffer(capacity: b.rows * b.cols))
        dnn.gemm(BF16.convert(a, into: ab.base), transposeA: transposeA, BF16.convert(b, into: bb.base), transposeB: transposeB,
                 into: c, accumulate: accumulate)
    }

    /// Rounds an activation to bf16 in place in a bf16 stack (nothing in fp32).
    func store(_ t: Tensor) { if precision == .bf16 { t.roundToBF16() } }

    func algorithm(_ layer: Layer) -> any AttentionAlgorithm {
        layer == .linear ? LinearSequenceParallel(.lasp2, exchange: .allGather) : AllGatherAttention()
    }

    /// A (B, C, ...) tensor as a (B*C) x cols matrix.
    static func flat(_ t: Tensor, cols: Int) -> Matrix { Matrix(base: t.pointer, rows: t.count / max(cols, 1), cols: cols) }

    static let normEpsilon: Float = 1e-6

    /// n = x / rms(x) per row of `width`; returns n and 1 / rms per row.
    static func rmsNorm(_ x: Tensor, width: Int) -> (n: Tensor, inverse: [Float]) {
        let n = Tensor(uninitialized: x.shape)
        let rows = x.count / max(width, 1)
        var inverse = [Float](repeating: 0, count: rows)
        for r in 0..<rows {
            let (src, dst) = (x.pointer + r * width, n.pointer + r * width)
            let inv = 1 / (VectorMath.dot(src, src, width) / Float(width) + normEpsilon).squareRoot()
            inverse[r] = inv
            for i in 0..<width { dst[i] = src[i] * inv }
        }
        return (n, inverse)
    }

    /// `dx += (dn - n mean(dn * n)) / rms` per row: the gradient through `rmsNorm`.
    static func rmsNormBackward(_ dn: Tensor, n: Tensor, inverse: [Float], width: Int, into dx: Tensor) {
        for r in 0..<inverse.count {
            let (g, y, out) = (dn.pointer + r * width, n.pointer + r * width, dx.pointer + r * width)
            let mean = VectorMath.dot(g, y, width) / Float(width)
            for i in 0..<width { out[i] += (g[i] - y[i] * mean) * inverse[r] }
        }
    }

    /// What a layer keeps for backward.
    public struct LayerCache: @unchecked Sendable {
        var normalized: Tensor
        var inverseRMS: [Float]
        var attention: LocalAttention
        var output: AttentionOutput
    }

    /// Forward through the stack on this rank's tokens: x (B, C, d) at `positions` (contiguous layout).
    public func forward(_ x: Tensor, positions: [Int], comm: some Communicator) throws -> (y: Tensor, cache: [LayerCache]) {
        if precision == .bf16 { try OneDNN.require() }
        let (b, c, g) = (shape.batch, positions.count, shape.kvHeads)
        var h = x
        var cache: [LayerCache] = []
        for (l, layer) in layers.enumerated() {
            let w = weights[l]
            let (n, inverse) = Self.rmsNorm(h, width: width)
            let xm = Self.flat(n, cols: width)
            let q = Tensor(uninitialized: [b, c, shape.heads, shape.headDim])
            let k = Tensor(uninitialized: [b, c, g, shape.headDim]), v = Tensor(uninitialized: [b, c, g, shape.headDim])
            product(xm, w.wq.matrix, into: Self.flat(q, cols: width))
            product(xm, w.wk.matrix, into: Self.flat(k, cols: g * shape.headDim))
            product(xm, w.wv.matrix, into: Self.flat(v, cols: g * shape.headDim))
            for t in [q, k, v] { store(t) }
            let local = LocalAttention(shape: shape, options: options(layer), positions: positions, q: q, k: k, v: v)
            let out = try algorithm(layer).forward(local, comm: comm)
            store(out.o)
            let y = h.copy()
            product(Self.flat(out.o, cols: width), w.wo.matrix, into: Self.flat(y, cols: width), accumulate: true)
            cache.append(LayerCache(normalized: n, inverseRMS: inverse, attention: local, output: out))
            h = y
        }
        return (h, cache)
    }

    /// Backward through the stack: dx (B, C, d) on this rank and the weight gradients summed over every rank.
    public func backward(_ cache: [LayerCache], gradOut dY: Tensor, comm: some Communicator) throws -> (dx: Tensor, dWeights: [Weights]) {
        if precision == .bf16 { try OneDNN.require() }
        var dy = dY
        let grads: [Weights] = weights.map { w in
            Weights(wq: Tensor(zeros: w.wq.shape), wk: Tensor(zeros: w.wk.shape), wv: Tensor(zeros: w.wv.shape), wo: Tensor(zeros: w.wo.shape))
        }
        let kvWidth = shape.kvHeads * shape.headDim
        for l in layers.indices.reversed() {
            let (w, c, dw) = (weights[l], cache[l], grads[l])
            let dym = Self.flat(dy, cols: width)
            product(Self.flat(c.output.o, cols: width), transposeA: true, dym, into: dw.wo.matrix)
            let dO = Tensor(uninitialized: c.output.o.shape)
            product(dym, w.wo.matrix, transposeB: true, into: Self.flat(dO, cols: width))
            store(dO)
            let ga = try algorithm(layers[l]).backward(c.attention, output: c.output, gradOut: dO, comm: comm)
            let xm = Self.flat(c.normalized, cols: width)
            let dn = Tensor(zeros: dy.shape)
            for (grad, weight, dWeight, cols) in [(ga.dq, w.wq, dw.wq, width), (ga.dk, w.wk, dw.wk, kvWidth), (ga.dv, w.wv, dw.wv, kvWidth)] {
                let gm = Self.flat(grad, cols: cols)
                product(xm, transposeA: true, gm, into: dWeight.matrix)
                product(gm, weight.matrix, transposeB: true, into: Self.flat(dn, cols: width), accumulate: true)
            }
            let dx = dy.copy()
            Self.rmsNormBackward(dn, n: c.normalized, inverse: c.inverseRMS, width: width, into: dx)
            dy = dx
        }
        // One all-reduce of every weight gradient.
        let all = grads.flatMap(\.all)
        let packed = Tensor(uninitialized: [all.map(\.count).reduce(0, +)])
        var offset = 0
        for t in all { (packed.pointer + offset).update(from: t.pointer, count: t.count); offset += t.count }
        try comm.allReduce(packed.buffer, op: .sum)
        offset = 0
        for t in all { t.pointer.update(from: packed.pointer + offset, count: t.count); offset += t.count }
        return (dy, grads)
    }
}

/// The same stack in one process, in Double: naive products, the norm from its definition, and the attention oracles (`DenseOracle`,
/// `LinearOracle`). The check for LASP-2H.
public enum HybridOracle {
    public struct Result: Sendable {
        public var y: [Double]
        public var dx: [Double]?
        /// Per layer: dWq, dWk, dWv, dWo, flattened.
        public var dWeights: [[[Double]]]?
    }

    /// c = op(a) op(b), a (m x k), b (k x n) after the transposes; row-major.
    static func matmul(_ a: [Double], _ b: [Double], m: Int, k: Int, n: Int, transposeA: Bool = false, transposeB: Bool = false) -> [Double] {
        var c = [Double](repeating: 0, count: m * n)
        for i in 0..<m {
            for p in 0..<k {
                let av = transposeA ? a[p * m + i] : a[i * k + p]
                if av == 0 { continue }
                for j in 0..<n { c[i * n + j] += av * (transposeB ? b[j * k + p] : b[p * n + j]) }
            }
        }
        return c
    }

    /// x (B, L, d) and dY (B, L, d) global; the stack's weights.
    public static func run(_ stack: HybridStack, x: Tensor, gradOut: Tensor?) -> Result {
        let s = stack.shape
        let (rows, d, kv) = (s.batch * s.seqLen, stack.width, s.kvHeads * s.headDim)
        let dims = (b: s.batch, l: s.seqLen, h: s.heads, g: s.kvHeads, d: s.headDim)
        let scale = Double(AttentionOptions().effectiveScale(headDim: s.headDim))
        let decay = stack.linear.decayPerHead(s.heads).map(Double.init)
        let w = stack.weights.map { $0.all.map { $0.toArray().map(Double.init) } }
        var h = x.toArray().map(Double.init)
        var saved: [(n: [Double], rms: [Double], q: [Double], k: [Double], v: [Double], o: [Double])] = []
        let epsilon = Double(HybridStack.normEpsilon)
        for (l, layer) in stack.layers.enumerated() {
            var n = h, rms = [Double](repeating: 0, count: rows)
            for r in 0..<rows {
                rms[r] = ((0..<d).map { h[r * d + $0] * h[r * d + $0] }.reduce(0, +) / Double(d) + epsilon).squareRoot()
                for i in 0..<d { n[r * d + i] = h[r * d + i] / rms[r] }
            }
            let q = matmul(n, w[l][0], m: rows, k: d, n: d), k = matmul(n, w[l][1], m: rows, k: d, n: kv), v = matmul(n, w[l][2], m: rows, k: d, n: kv)
            let o = layer == .linear
                ? LinearOracle.forward(q: q, k: k, v: v, dims: dims, decay: decay, featureMap: stack.linear.featureMap, causal: true, documents: stack.documents)
                : DenseOracle.forward(q: q, k: k, v: v, dims: dims, causal: true, documents: stack.documents, scale: scale).o
            saved.append((n, rms, q, k, v, o))
            let proj = matmul(o, w[l][3], m: rows, k: d, n: d)
            h = zip(h, proj).map(+)
        }
        guard let gradOut else { return Result(y: h, dx: nil, dWeights: nil) }
        var dy = gradOut.toArray().map(Double.init)
        var dWeights = [[[Double]]](repeating: [], count: stack.layers.count)
        for l in stack.layers.indices.reversed() {
            let c = saved[l]
            let dWo = matmul(c.o, dy, m: d, k: rows, n: d, transposeA: true)
            let dO = matmul(dy, w[l][3], m: rows, k: d, n: d, transposeB: true)
            let g = stack.layers[l] == .linear
                ? LinearOracle.backward(q: c.q, k: c.k, v: c.v, gradOut: dO, dims: dims, decay: decay, featureMap: stack.linear.featureMap, causal: true,
                                        documents: stack.documents)
                : DenseOracle.backward(q: c.q, k: c.k, v: c.v, gradOut: dO, dims: dims, causal: true, documents: stack.documents, scale: scale)
            var dn = [Double](repeating: 0, count: rows * d)
            var dw: [[Double]] = []
            for (grad, weight, cols) in [(g.dq, w[l][0], d), (g.dk, w[l][1], kv), (g.dv, w[l][2], kv)] {
                dw.append(matmul(c.n, grad, m: d, k: rows, n: cols, transposeA: true))
                dn = zip(dn, matmul(grad, weight, m: rows, k: cols, n: d, transposeB: true)).map(+)
            }
            var dx = dy
            for r in 0..<rows {
                let mean = (0..<d).map { dn[r * d + $0] * c.n[r * d + $0] }.reduce(0, +) / Double(d)
                for i in 0..<d { dx[r * d + i] += (dn[r * d + i] - c.n[r * d + i] * mean) / c.rms[r] }
            }
            dWeights[l] = dw + [dWo]
            dy = dx
        }
        return Result(y: h, dx: dy, dWeights: dWeights)
    }
}

extension SeededInputs {
    /// Rows `positions` of the hybrid model's seeded input x (B, L, d) or output gradient dY (B, L, d).
    public static func hidden(_ stream: Stream, seed: UInt64, batch: Int, length: Int, width: Int, positions: [Int]) -> Tensor {
        tensor(stream, seed: seed, batch: batch, length: length, heads: 1, dim: width, positions: positions)
            .reshaped([batch, positions.count, width])
    }
}
