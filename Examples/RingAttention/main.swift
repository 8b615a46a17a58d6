// Ring attention on 4 ranks of an in-process cluster (threads of this process), checked against dense attention
// computed in Double on the whole sequence. Under MPI, the same body runs with SeqParMPI's MPIEnvironment().world.
import SeqPar

let shape = AttentionShape(seqLen: 512, heads: 4, kvHeads: 2, headDim: 64)
let options = AttentionOptions(causal: true, layout: .zigzag)

// Each rank generates q, k, v for its own tokens, runs ring attention forward and backward,
// and gathers the output in global order.
let gathered = try InProcessCluster.run(ranks: 4) { comm in
    let tokens = options.layout.positions(rank: comm.rank, ranks: comm.size, length: shape.seqLen)
    let x = SeededInputs.attention(shape: shape, options: options, positions: tokens, seed: 0)
    let out = try RingAttention().forward(x, comm: comm)
    let dO = SeededInputs.gradOut(shape: shape, positions: tokens, seed: 0)
    let grads = try RingAttention().backward(x, output: out, gradOut: dO, comm: comm)
    print("rank \(comm.rank): \(tokens.count) tokens, o \(out.o.shape), dq \(grads.dq.shape)")
    return try options.layout.gather(out.o, length: shape.seqLen, comm: comm)
}

let all = SeededInputs.attention(shape: shape, options: options, positions: Array(0..<shape.seqLen), seed: 0)
let scale = Double(options.effectiveScale(headDim: shape.headDim))
let reference = DenseOracle.forward(q: all.q, k: all.k, v: all.v, causal: true, scale: scale).o
let error = zip(gathered[0].toArray(), reference).map { abs(Double($0) - $1) }.max()! / reference.map(abs).max()!
print("ring attention on 4 ranks: max relative error against the Double oracle \(error)")
precondition(error < 2e-5)
