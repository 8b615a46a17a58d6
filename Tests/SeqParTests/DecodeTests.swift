// The prefill -> decode handoff: every cache element lands on the right rank at its global row (L not divisible by
// P, zigzag prefill), the prefill across ranks equals one process, TP-MLA's decode equals single-process MLA
// decoding, TPLA at P = 1 is MLA, and a TPLA step makes one all-reduce and nothing else.
import Foundation
import Testing
@testable import SeqPar

@Suite struct DecodeTests {
    static func config(_ algorithm: LatentAlgorithm, transform: LatentTransform = .none) -> DecodeConfig {
        var c = DecodeConfig()
        (c.algorithm, c.promptLength, c.steps, c.modelDim, c.heads) = (algorithm, 37, 3, 48, 12)
        (c.latentDim, c.ropeDim, c.nopeDim, c.vDim, c.transform, c.check) = (96, 8, 16, 16, transform, true)
        return c
    }

    @Test(arguments: [2, 3, 4], [LatentAlgorithm.tpla, .tpMLA])
    func handoffPlacesEveryRow(ranks: Int, algorithm: LatentAlgorithm) throws {
        // d_c = 96 splits over 2, 3 and 4 ranks (Hadamard needs a power of two: the step test covers it).
        for transform in [LatentTransform.none, .pca] {
            let c = Self.config(algorithm, transform: transform)
            let w = MLAWeights(c)
            let all = Array(0..<c.promptLength)
            let global = Projected(SeededInputs.hidden(.hidden, seed: c.seed, batch: 1, length: c.promptLength, width: c.modelDim, positions: all),
                                   positions: all, weights: w, config: c)
            let r: Tensor? = transform == .pca ? try LatentTransform.pca(global.c, slices: algorithm == .tpla ? ranks : 1)
                                               : try transform.matrix(latentDim: c.latentDim)
            let caches = try InProcessCluster.run(ranks: ranks) { comm -> Tensor in
                let positions = c.layout.positions(rank: comm.rank, ranks: comm.size, length: c.promptLength)
                let x = SeededInputs.hidden(.hidden, seed: c.seed, batch: 1, length: c.promptLength, width: c.modelDim, positions: positions)
                return try DecodeRun.handoff(Projected(x, positions: positions, weights: w, config: c), transform: r, config: c, comm: comm).toTensor()
            }
            for (rank, cache) in caches.enumerated() {
                let cols = LatentShard.split(algorithm, heads: c.heads, latentDim: c.latentDim, rank: rank, ranks: ranks).cols
                let expected = LatentShard.columns(global.c.matrix, transform: r, cols: cols)
                let width = cols.count + c.ropeDim
                #expect(cache.shape == [c.promptLength + c.steps, width])
                var worst: Float = 0
                for row in 0..<c.promptLength {
                    for j in 0..<cols.count { worst = max(worst, abs(cache.pointer[row * width + j] - expected.pointer[row * cols.count + j])) }
                    for j in 0..<c.ropeDim { worst = max(worst, abs(cache.pointer[row * width + cols.count + j] - global.kr.pointer[row * c.ropeDim + j])) }
                }
                #expect(worst <= 1e-5, "\(algorithm) \(transform) P=\(ranks) rank \(rank): cache differs by \(worst)")
                #expect(cache.buffer[(c.promptLength * width)...].allSatisfy { $0 == 0 }, "rows for the decode steps start empty")
            }
        }
    }

    @Test func decodeMatchesMLA() throws {
        for (algorithm, ranks) in [(LatentAlgorithm.tpMLA, 1), (.tpMLA, 2), (.tpMLA, 4), (.tpla, 1), (.mla, 1)] {
            for transform in [LatentTransform.none, .pca] {
                let reports = try InProcessCluster.run(ranks: ranks) { try DecodeRun.execute(Self.config(algorithm, transform: transform), comm: $0, backend: "test") }
                let r = reports[0]
                #expect(r.prefillError! <= 2e-5 && r.differenceFromMLA <= 2e-5 && r.passed == true,
                        "\(algorithm) P=\(ranks) \(transform): prefill \(r.prefillError!), decode vs MLA \(r.differenceFromMLA)")
            }
        }
    }

    @Test(arguments: [2, 4])
    func tplaStepIsOneAllReduce(ranks: Int) throws {
        for transform in LatentTransform.allCases {
            var config = Self.config(.tpla, transform: transform)
            config.latentDim = 64
            let c = config
            let r = try InProcessCluster.run(ranks: ranks) { try DecodeRun.execute(c, comm: $0, backend: "test") }[0]
            #expect(r.stepCollectives == 1 && r.stepMessages == 0 && r.stepBytesSent == c.heads * c.vDim * 4, "\(r)")
            #expect(r.prefillError! <= 2e-5 && r.differenceFromMLA.isFinite)
            #expect(r.cacheBytes.allSatisfy { $0 == (c.promptLength + c.steps) * (c.latentDim / ranks + c.ropeDim) * 4 })
        }
    }

    /// Weights read from .npy files give the same run as the seeded weights they were written from; a file whose
    /// shape disagrees with the others is refused, naming it.
    @Test func weightsFromFiles() throws {
        let c = Self.config(.tpla)
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("seqpar-weights-\(getpid())").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let w = MLAWeights(c)
        for (name, t) in zip(MLAWeights.fileNames, [w.wDKV, w.wKR, w.wQ, w.wUK, w.wUV, w.wO]) { try NPY.write(t, to: dir + "/" + name + ".npy") }
        var edited = c
        (edited.modelDim, edited.heads, edited.weightsDirectory) = (1, 1, dir)  // the files set the sizes
        let fromFiles = edited
        let a = try InProcessCluster.run(ranks: 2) { try DecodeRun.execute(c, comm: $0, backend: "test") }[0]
        let b = try InProcessCluster.run(ranks: 2) { try DecodeRun.execute(fromFiles, comm: $0, backend: "test") }[0]
        #expect(a.differenceFromMLA == b.differenceFromMLA && a.prefillError == b.prefillError && b.config.heads == c.heads)
        try NPY.write(Tensor(zeros: [3, 3]), to: dir + "/W_O.npy")
        #expect { _ = try InProcessCluster.run(ranks: 2) { try DecodeRun.execute(fromFiles, comm: $0, backend: "test") } } throws: {
            "\($0)".contains("W_O.npy has shape [3, 3]")
        }
    }

    @Test func badSizesAreRefused() {
        var c = Self.config(.tpla)
        c.ropeDim = 7
        #expect { try c.validate(ranks: 2) } throws: { "\($0)".contains("must be even") }
        c = Self.config(.tpla)
        c.vDim = 100
        #expect { try c.validate(ranks: 2) } throws: { "\($0)".contains("wider than the keys") }
        c = Self.config(.tpla)
        #expect { try c.validate(ranks: 5) } throws: { "\($0)".contains("5 ranks do not divide --latent-dim 96") }
    }
}
