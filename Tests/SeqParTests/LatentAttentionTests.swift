// MLA, TP-MLA and TPLA (latent attention for decoding): against the Double definitions (`LatentOracle`: MLA is
// TPLA with one slice) on the in-process cluster, with and without the Hadamard transform; the transform leaves MLA
// unchanged; TPLA at P = 1 is MLA; its communication is one all-reduce; sizes that cannot split are refused.
import Foundation
import Testing
@testable import SeqPar

@Suite struct LatentAttentionTests {
    struct Run: @unchecked Sendable { var o: Tensor; var counters: CommCounters }

    static let shape = LatentShape(seqLen: 301, queries: 3, heads: 8, latentDim: 64, ropeDim: 16, vDim: 32)

    func run(_ algorithm: LatentAlgorithm, ranks: Int, _ x: LatentInputs, transform: LatentTransform) throws -> [Run] {
        let s = x.shape
        let r = try transform.matrix(latentDim: s.latentDim, cache: x.latent, slices: algorithm == .tpla ? ranks : 1)
        return try InProcessCluster.run(ranks: ranks) { comm -> Run in
            try algorithm.validate(ranks: comm.size, shape: s)
            let shard = LatentShard.make(algorithm, x, transform: r, rank: comm.rank, ranks: comm.size)
            comm.resetCounters()
            let o = try LatentParallel.combine(algorithm, shard.attend(vDim: s.vDim, scale: s.defaultScale), shape: s, comm: comm)
            return Run(o: o, counters: comm.counters)
        }
    }

    @Test(arguments: LatentTransform.allCases)
    func mlaAndTPMLAMatchTheDefinition(transform: LatentTransform) throws {
        let x = LatentInputs.seeded(Self.shape, seed: 1)
        let reference = LatentOracle.tpla(x, transform: nil, slices: 1, scale: Double(Self.shape.defaultScale))
        // The transform is folded into c, q_c and W_UV: MLA's output does not change.
        let mla = try run(.mla, ranks: 1, x, transform: transform)[0].o
        #expect(relativeError(mla, reference) <= 2e-5, "mla \(transform): \(relativeError(mla, reference))")
        for ranks in [1, 2, 4, 8] {
            for r in try run(.tpMLA, ranks: ranks, x, transform: transform) {
                #expect(relativeError(r.o, reference) <= 2e-5, "tp-mla P=\(ranks) \(transform): \(relativeError(r.o, reference))")
            }
        }
        // TPLA on one rank is MLA.
        let tpla1 = try run(.tpla, ranks: 1, x, transform: transform)[0].o
        #expect(relativeError(tpla1, reference) <= 2e-5, "tpla P=1 \(transform): \(relativeError(tpla1, reference))")
    }

    @Test(arguments: [2, 4, 8], LatentTransform.allCases)
    func tplaMatchesItsDefinition(ranks: Int, transform: LatentTransform) throws {
        for outliers in [0, 4] {
            let x = LatentInputs.seeded(Self.shape, seed: 2, outliers: outliers)
            let expected = LatentOracle.tpla(x, transform: try transform.matrix(latentDim: 64, cache: x.latent, slices: ranks), slices: ranks,
                                             scale: Double(Self.shape.defaultScale))
            let mla = LatentOracle.tpla(x, transform: nil, slices: 1, scale: Double(Self.shape.defaultScale))
            let runs = try run(.tpla, ranks: ranks, x, transform: transform)
            for r in runs {
                #expect(relativeError(r.o, expected) <= 2e-5, "tpla P=\(ranks) \(transform) outliers \(outliers): \(relativeError(r.o, expected))")
                // One all-reduce of the (T, H, d_v) output per step, nothing else.
                #expect(r.counters[.allReduce] == 1 && r.counters.collectives == 1 && r.counters.messagesSent == 0, "\(r.counters)")
                #expect(r.counters.bytesSent == Self.shape.queries * Self.shape.heads * Self.shape.vDim * 4)
            }
            // An approximation: it differs from MLA (reported, never hidden), but stays finite.
            #expect(relativeError(runs[0].o, mla) > 1e-3 && runs[0].o.firstNonFinite() == nil)
        }
    }

    /// Inputs from .npy files give the same output file as the generated inputs they were written from; a file
    /// whose shape disagrees with the others is refused on every rank, naming it.
    @Test func inputsFromFiles() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("seqpar-latent-\(getpid())").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let x = LatentInputs.seeded(Self.shape, seed: 4)
        let names = ["c", "kr", "qc", "qr", "wuv"]
        for (name, t) in zip(names, [x.latent, x.ropeK, x.qLatent, x.qRope, x.wUV]) { try NPY.write(t, to: "\(dir)/\(name).npy") }
        var generated = LatentRunConfig(algorithm: .tpla, shape: Self.shape)
        (generated.seed, generated.transform, generated.outPath, generated.check) = (4, .hadamard, "\(dir)/generated.npy", true)
        var fromFiles = generated
        (fromFiles.shape, fromFiles.files, fromFiles.outPath) = (LatentShape(seqLen: 1, heads: 1, latentDim: 1, ropeDim: 0, vDim: 1),
                                                                 names.map { "\(dir)/\($0).npy" }, "\(dir)/files.npy")
        for config in [generated, fromFiles] {
            let reports = try InProcessCluster.run(ranks: 4) { try LatentRun.execute(config, comm: $0, backend: "test") }
            #expect(reports[0].check?.passed == true && reports[0].seqLen == Self.shape.seqLen)
        }
        #expect(try NPY.read("\(dir)/generated.npy").toArray() == NPY.read("\(dir)/files.npy").toArray())
        try NPY.write(Tensor(zeros: [8, 32, 5]), to: "\(dir)/wuv.npy")
        let bad = fromFiles
        let errors = try InProcessCluster.run(ranks: 2) { comm -> String in
            do { _ = try LatentRun.execute(bad, comm: comm, backend: "test"); return "no error" } catch { return "\(error)" }
        }
        for e in errors { #expect(e.contains("wuv.npy (--w-uv) has shape [8, 32, 5], but the others make it [8, 64, 5]"), "\(e)") }
    }

    @Test func sizesThatCannotSplitAreRefused() throws {
        let s = LatentShape(seqLen: 10, heads: 6, latentDim: 96, ropeDim: 8, vDim: 8)
        #expect { try LatentAlgorithm.tpla.validate(ranks: 5, shape: s) } throws: { "\($0)".contains("5 ranks do not divide --latent-dim 96") }
        #expect { try LatentAlgorithm.tpMLA.validate(ranks: 4, shape: s) } throws: { "\($0)".contains("4 ranks do not divide --heads 6") }
        #expect { try LatentAlgorithm.mla.validate(ranks: 2, shape: s) } throws: { "\($0)".contains("single-rank reference") }
        #expect { _ = try LatentTransform.hadamard.matrix(latentDim: 96) } throws: { "\($0)".contains("power of two") }
    }

    /// Both transforms are orthogonal (R R^T = I); PCA's columns are eigenvectors of c^T c, dealt round-robin: the
    /// first column of each of the 4 slices holds the 4 largest components, in order.
    @Test func transformsAreOrthogonal() throws {
        let x = LatentInputs.seeded(Self.shape, seed: 3, outliers: 4)
        for transform in [LatentTransform.hadamard, .pca] {
            let r = try transform.matrix(latentDim: 64, cache: x.latent, slices: 4)!
            let p = Tensor(zeros: [64, 64])
            BLAS.gemm(r.matrix, r.matrix, transposeB: true, into: p.matrix)
            for i in 0..<64 { for j in 0..<64 { #expect(abs(p.pointer[i * 64 + j] - (i == j ? 1 : 0)) < 1e-4, "\(transform) (\(i), \(j))") } }
        }
        // Rayleigh quotients |c r_col|^2 of PCA's columns: slice heads 0, 16, 32, 48 descend and top every other column.
        let r = try LatentTransform.pca.matrix(latentDim: 64, cache: x.latent, slices: 4)!
        let projected = Tensor(zeros: [Self.shape.seqLen, 64])
        BLAS.gemm(x.latent.matrix, r.matrix, into: projected.matrix)
        let energy = (0..<64).map { col in (0..<Self.shape.seqLen).map { Double(projected.pointer[$0 * 64 + col]) }.map { $0 * $0 }.reduce(0, +) }
        let heads = [0, 16, 32, 48].map { energy[$0] }
        #expect(heads == heads.sorted(by: >), "\(heads)")
        #expect(heads.last! >= (energy.enumerated().filter { ![0, 16, 32, 48].contains($0.offset) }.map(\.element).max() ?? 0) * 0.999)
    }
}
