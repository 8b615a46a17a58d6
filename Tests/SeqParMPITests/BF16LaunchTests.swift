// bf16 under a real mpirun: the issue's done-when command (ring, zigzag, causal, backward, L = 3001, GQA, checked
// under the bf16 rule), every softmax algorithm checked in bf16, the JSON report's bf16 fields, the CLI's bf16 options
// (demo, bench attention, bench overlap, info), and bad input: an unknown precision, an input beyond bf16's range.
import Foundation
import Testing

@Suite(.serialized) struct BF16LaunchTests {
    init() {
        precondition(FileManager.default.isExecutableFile(atPath: Harness.binary), "seqpar binary not found at \(Harness.binary): run `swift build` first")
    }

    /// The issue's done-when command, as given. Its time is printed (a debug build on 2 cores is slow: most of it is
    /// the debug build's kernel; the check's oracles run through dgemm).
    @Test func doneWhenCommandPasses() throws {
        let args = ["attention", "--algorithm", "ring", "--layout", "zigzag", "--causal", "--backward", "--precision", "bf16",
                    "--seq-len", "3001", "--heads", "8", "--kv-heads", "2", "--head-dim", "64", "--check"]
        let r = try Harness.mpirun(3, args, timeout: 900)
        print("bf16 done-when command (mpirun -np 3 seqpar \(args.joined(separator: " "))): \(String(format: "%.1f", r.seconds)) s")
        #expect(!r.timedOut && r.status == 0, "\(r.output)")
        #expect(r.output.contains("bf16 rule") && r.output.contains(": PASS") && r.output.contains("precision bf16"), "\(r.output)")
    }

    /// Every softmax algorithm in bf16 under mpirun, forward and backward, checked; the JSON carries the precision,
    /// both errors and the bounds; the K/V bytes are half those of the same fp32 run (forward).
    @Test(arguments: [2, 3]) func softmaxAlgorithmsInBF16UnderMPI(np: Int) throws {
        for algorithm in ["allgather", "ring", "rsa", "ulysses"] {
            let heads = algorithm == "ulysses" ? [String(2 * np), String(np)] : ["4", "2"]
            let base = ["attention", "--algorithm", algorithm, "--seq-len", "61", "--heads", heads[0], "--kv-heads", heads[1], "--head-dim", "16",
                        "--backward", "--check", "--causal", "--layout", "zigzag", "--json"]
            let b = try Harness.mpirun(np, base + ["--precision", "bf16"])
            #expect(!b.timedOut && b.status == 0, "\(algorithm): \(b.output)")
            let json = try #require(b.output.split(separator: "\n").last.flatMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] },
                                    "\(b.output)")
            let check = try #require(json["check"] as? [String: Any])
            #expect(json["precision"] as? String == "bf16" && check["precision"] as? String == "bf16" && check["passed"] as? Bool == true, "\(b.output)")
            for key in ["plain_bf16_forward_error", "plain_bf16_dq_error", "forward_bound", "dq_bound", "dk_bound", "dv_bound"] {
                #expect(check[key] is Double, "\(algorithm): \(key) in \(check)")
            }
            if algorithm != "ulysses" {
                let f = try Harness.mpirun(np, base)
                let fj = try #require(f.output.split(separator: "\n").last.flatMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] })
                func forwardSent(_ j: [String: Any]) -> [Int] { (j["per_rank"] as? [[String: Any]] ?? []).map { ($0["forward"] as? [String: Any])?["bytes_sent"] as? Int ?? -1 } }
                #expect(forwardSent(fj).map { $0 / 2 } == forwardSent(json), "\(algorithm): fp32 \(forwardSent(fj)), bf16 \(forwardSent(json))")
            }
        }
    }

    @Test func denseInBF16UnderMPIOneRank() throws {
        let r = try Harness.mpirun(1, ["attention", "--algorithm", "dense", "--seq-len", "70", "--heads", "4", "--kv-heads", "2", "--head-dim", "32",
                                       "--backward", "--check", "--precision", "bf16"])
        #expect(!r.timedOut && r.status == 0 && r.output.contains("bf16 rule") && r.output.contains(": PASS"), "\(r.output)")
    }

    /// An unknown precision names the accepted values; an input finite in fp32 but beyond bf16's range is refused on
    /// every rank, naming the file and the index, under mpirun and in process.
    @Test func badBF16InputFailsClearly() throws {
        for run in [try Harness.mpirun(3, ["attention", "--algorithm", "ring", "--precision", "fp16"], timeout: 60),
                    try Harness.simulated(["attention", "--algorithm", "ring", "--precision", "fp16", "--ranks", "3"], timeout: 60)] {
            #expect(!run.timedOut && run.status != 0 && run.output.contains("fp16") && run.output.contains("fp32") && run.output.contains("bf16"), "\(run.output)")
        }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("seqpar-bf16-bad-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        func npy(_ name: String, _ values: [Float]) -> String {
            var header = "{'descr': '<f4', 'fortran_order': False, 'shape': (6, 2, 4), }"
            header += String(repeating: " ", count: (64 - (10 + header.utf8.count + 1) % 64) % 64) + "\n"
            var bytes: [UInt8] = [0x93, 0x4E, 0x55, 0x4D, 0x50, 0x59, 1, 0, UInt8(header.utf8.count & 0xFF), UInt8(header.utf8.count >> 8)]
            bytes += Array(header.utf8)
            for v in values { withUnsafeBytes(of: v.bitPattern.littleEndian) { bytes += $0 } }
            let path = dir.appendingPathComponent(name).path
            _ = FileManager.default.createFile(atPath: path, contents: Data(bytes))
            return path
        }
        let good = (0..<48).map { Float($0 % 7) * 0.1 }
        var big = good
        big[5 * 8 + 1 * 4 + 3] = -3.4e38  // token 5, head 1, dim 3
        let (q, k) = (npy("q.npy", good), npy("big.npy", big))
        let args = ["attention", "--algorithm", "allgather", "--q", q, "--k", k, "--v", q, "--precision", "bf16"]
        let message = "big.npy holds a value at (batch, token, head, dim) [0, 5, 1, 3] that overflows bf16's range"
        let r = try Harness.mpirun(3, args, timeout: 60)
        #expect(!r.timedOut && r.status != 0 && r.output.contains(message), "\(r.output)")
        let s = try Harness.simulated(args + ["--ranks", "3"], timeout: 60)
        #expect(!s.timedOut && s.status != 0 && s.output.contains(message), "\(s.output)")
        // The same files in fp32 run.
        let ok = try Harness.mpirun(3, Array(args.dropLast(2)), timeout: 60)
        #expect(ok.status == 0, "\(ok.output)")
    }

    /// A host without oneDNN: a bf16 run stops on every rank with the error that names the package (no hang, non-zero
    /// exit), an fp32 run does not need it, and info warns.
    @Test func missingOneDNNFailsClearlyOnEveryRank() throws {
        let env = ["SEQPAR_DNNL_LIBRARY": "/nonexistent/libdnnl.so.2"]
        let args = ["attention", "--algorithm", "ring", "--seq-len", "40", "--heads", "2", "--head-dim", "8", "--precision", "bf16"]
        let r = try Harness.mpirun(3, args, timeout: 60, environment: env)
        #expect(!r.timedOut && r.status != 0, "\(r.output)")
        #expect(r.output.contains("ranks [0, 1, 2]") && r.output.contains("apt-get install libdnnl2") && r.output.contains("/nonexistent/libdnnl.so.2"), "\(r.output)")
        let fp32 = try Harness.mpirun(3, Array(args.dropLast(2)), timeout: 60, environment: env)
        #expect(fp32.status == 0, "\(fp32.output)")
        let info = try Harness.mpirun(2, ["info"], timeout: 60, environment: env)
        #expect(info.status == 0 && info.output.contains("cannot be loaded") && info.output.contains("apt-get install libdnnl2"), "\(info.output)")
    }

    /// demo, bench attention and bench overlap take --precision bf16; info reports oneDNN.
    @Test func cliTakesBF16() throws {
        let demo = try Harness.simulated(["demo", "--precision", "bf16", "--seq-len", "48", "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--ranks", "2"], timeout: 300)
        #expect(!demo.timedOut && demo.status == 0 && !demo.output.contains("FAIL"), "\(demo.output)")
        #expect(demo.output.contains("precision bf16") && demo.output.contains("dq_bound") && demo.output.contains("lasp2"), "\(demo.output)")
        // Every algorithm: the hybrid stack and both latent decode steps follow the table, each checked.
        for name in ["lasp2h", "tp-mla", "tpla"] {
            #expect(demo.output.split(separator: "\n").contains { $0.hasPrefix(name + " ") && $0.hasSuffix("PASS  ") }, "\(name) in \(demo.output)")
        }
        let bench = try Harness.mpirun(2, ["bench", "attention", "--algorithm", "ring", "allgather", "--precision", "bf16", "--seq-len", "256", "--heads", "2",
                                           "--head-dim", "32", "--repeats", "1", "--warmup", "0", "--json"], timeout: 300)
        #expect(!bench.timedOut && bench.status == 0 && bench.output.contains("\"precision\":\"bf16\""), "\(bench.output)")
        let overlap = try Harness.mpirun(2, ["bench", "overlap", "--precision", "bf16", "--seq-len", "256", "--heads", "2", "--head-dim", "32",
                                             "--repeats", "1", "--warmup", "0", "--forward-only", "--json"], timeout: 300)
        #expect(!overlap.timedOut && overlap.status == 0 && overlap.output.contains("\"precision\":\"bf16\""), "\(overlap.output)")
        // 256 tokens over 2 ranks, one kv head pair of 2 x 32: a bf16 block of 128 x 2 x 2 x 32 x 2 bytes.
        #expect(overlap.output.contains("\"block_bytes\":\(128 * 2 * 2 * 32 * 2)"), "\(overlap.output)")
        let info = try Harness.mpirun(2, ["info"], timeout: 60)
        #expect(info.status == 0 && info.output.contains("onednn: version") && info.output.contains("isa"), "\(info.output)")
    }
}
