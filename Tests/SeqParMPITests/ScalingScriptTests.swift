// launch/scaling end to end under mpirun on tiny sizes: the sweep writes its JSON lines, the exact command, a CSV
// with a row per figure and both SVG plots; bad options are refused with a message. `seqpar report` and
// `seqpar model` on files that are not sweeps fail with the file and line named.
import Foundation
import Testing

@Suite(.serialized) struct ScalingScriptTests {
    @Test func aTinyWeakSweepWritesCSVAndPlots() throws {
        guard Harness.mpirunAvailable else { print("skipped: mpirun not found"); return }
        let out = FileManager.default.temporaryDirectory.appendingPathComponent("seqpar-sweep-\(getpid())")
        defer { try? FileManager.default.removeItem(at: out) }
        let r = try Harness.run([Harness.root.appendingPathComponent("launch/scaling").path, "weak", "--ranks", "1 2", "--algorithms", "ring:zigzag lasp2 tpla",
                                 "--tokens-per-rank", "64", "--heads", "2", "--head-dim", "16", "--repeats", "1", "--warmup", "0", "--decode-len", "256",
                                 "--bind", "none", "--out", out.path],
                                timeout: 240, directory: Harness.root, environment: ["SEQPAR": Harness.binary])
        #expect(r.status == 0, "\(r.output)")
        let csv = try String(contentsOf: out.appendingPathComponent("weak.csv"), encoding: .utf8).split(separator: "\n")
        #expect(csv.count == 1 + 2 * 3, "\(csv)")  // ring, lasp2, tpla at 1 and 2 ranks
        let efficiency = csv[0].split(separator: ",").firstIndex(of: "efficiency")!
        #expect(csv.dropFirst().allSatisfy { !$0.split(separator: ",", omittingEmptySubsequences: false)[efficiency].isEmpty })
        for plot in ["weak-efficiency.svg", "weak-time.svg"] {
            let svg = try String(contentsOf: out.appendingPathComponent(plot), encoding: .utf8)
            #expect(svg.hasPrefix("<svg") && svg.components(separatedBy: "<polyline").count - 1 == 3)
        }
        let command = try String(contentsOf: out.appendingPathComponent("weak.command"), encoding: .utf8)
        #expect(command.contains("launch/scaling weak --ranks \"1 2\" --algorithms \"ring:zigzag lasp2 tpla\" --tokens-per-rank 64"))
    }

    /// A sweep split over calls, one rank count each (benchmarks/scaling-figures.sh interleaved): the calls without
    /// a baseline leave the CSV and plots to `seqpar report` over the merged files, whose one-rank point gives every
    /// figure its efficiency.
    @Test func aSweepSplitOverCallsMergesIntoOne() throws {
        guard Harness.mpirunAvailable else { print("skipped: mpirun not found"); return }
        let out = FileManager.default.temporaryDirectory.appendingPathComponent("seqpar-split-\(getpid())")
        defer { try? FileManager.default.removeItem(at: out) }
        var merged = ""
        for (p, extra) in [("1", [String]()), ("2", ["--no-baseline"])] {
            let dir = out.appendingPathComponent("p\(p)")
            let r = try Harness.run([Harness.root.appendingPathComponent("launch/scaling").path, "weak", "--ranks", p, "--algorithms", "ring:zigzag",
                                     "--tokens-per-rank", "64", "--heads", "2", "--head-dim", "16", "--repeats", "1", "--warmup", "0",
                                     "--bind", "none", "--out", dir.path] + extra,
                                    timeout: 120, directory: Harness.root, environment: ["SEQPAR": Harness.binary])
            #expect(r.status == 0, "\(r.output)")
            merged += try String(contentsOf: dir.appendingPathComponent("weak.jsonl"), encoding: .utf8)
            #expect(FileManager.default.fileExists(atPath: dir.appendingPathComponent("weak.csv").path) == extra.isEmpty)
            if !extra.isEmpty {
                #expect(r.output.contains("no CSV or plots here"))
                // Each launch skipped its baseline: every bench command in the log says so.
                let log = try String(contentsOf: dir.appendingPathComponent("weak.log"), encoding: .utf8)
                let commands = log.split(separator: "\n").filter { $0.hasPrefix("$ ") }
                #expect(!commands.isEmpty && commands.allSatisfy { $0.contains("--no-baseline") && !$0.contains("--baseline-seq-len") }, "\(log)")
                #expect(try String(contentsOf: dir.appendingPathComponent("weak.command"), encoding: .utf8).contains("--no-baseline"))
            }
        }
        let file = out.appendingPathComponent("weak.jsonl")
        try Data(merged.utf8).write(to: file)
        let report = try Harness.simulated(["report", file.path, "--mode", "weak", "--out", out.appendingPathComponent("weak").path])
        #expect(report.status == 0, "\(report.output)")
        let csv = try String(contentsOf: out.appendingPathComponent("weak.csv"), encoding: .utf8).split(separator: "\n")
        let efficiency = csv[0].split(separator: ",").firstIndex(of: "efficiency")!
        #expect(csv.count == 3 && csv.dropFirst().allSatisfy { !$0.split(separator: ",", omittingEmptySubsequences: false)[efficiency].isEmpty }, "\(csv)")
    }

    @Test(arguments: [
        (["sideways"], "the first argument is the mode"),
        (["weak", "--ranks", "1 two"], "'two' is not a positive whole number"),
        (["strong", "--algorithms", "ring flash"], "unknown algorithm 'flash'"),
        (["weak", "--bind", "socket"], "--bind is core or none"),
        (["weak", "--frobnicate"], "unknown option '--frobnicate'"),
        (["weak", "--busy-baseline"], "--busy-baseline: give --ranks without 1"),
        (["weak", "--ranks", "2", "--busy-baseline", "--no-baseline"], "--no-baseline runs no baseline"),
        (["weak", "--ranks", "2", "--baseline-seq-len", "64", "--no-baseline"], "--no-baseline runs no baseline"),
    ]) func badOptionsAreRefused(arguments: [String], message: String) throws {
        let r = try Harness.run([Harness.root.appendingPathComponent("launch/scaling").path] + arguments, timeout: 30, directory: Harness.root,
                                environment: ["SEQPAR": Harness.binary])
        #expect(r.status == 2 && r.output.contains(message), "\(r.output)")
    }

    @Test func reportAndModelNameTheBadLine() throws {
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("seqpar-bad-\(getpid()).jsonl")
        defer { for suffix in ["", "-cal", "-empty", "-out.csv"] { try? FileManager.default.removeItem(atPath: file.path + suffix) } }
        try Data("{\"bench\":\"attention\",\"algorithm\":\"ring\",\"direction\":\"forward\",\"ranks\":1,\"seq_len\":8,\"heads\":1,\"time_s\":1}\n{oops\n".utf8).write(to: file)
        let report = try Harness.simulated(["report", file.path, "--mode", "weak", "--out", file.path + "-out"])
        #expect(report.status == 1 && report.output.contains("line 2: malformed JSON"), "\(report.output)")
        try Data("# a comment\n{oops\n".utf8).write(to: URL(fileURLWithPath: file.path + "-cal"))
        let model = try Harness.simulated(["model", "predict", "--calibration", file.path + "-cal"])
        #expect(model.status == 1 && model.output.contains("line 2: malformed JSON"), "\(model.output)")
        try Data().write(to: URL(fileURLWithPath: file.path + "-empty"))
        let empty = try Harness.simulated(["report", file.path + "-empty", "--mode", "strong", "--out", file.path + "-out"])
        #expect(empty.status == 1 && empty.output.contains("no figures in it"), "\(empty.output)")
        let network = try Harness.simulated(["model", "predict", "--calibration", Harness.root.appendingPathComponent("benchmarks/results/scaling/calibration-kernel.jsonl").path,
                                             "--network", "bw=fast"])
        #expect(network.status == 1 && network.output.contains("--network"), "\(network.output)")
    }
}
