// Printing run reports: a table a person can read (`#` header lines, fixed-width columns), or one JSON object.
import Foundation
import SeqPar

enum Report {
    static func json(_ value: some Encodable) -> String {
        let encoder = JSONEncoder()
        encoder.keyEncodingStrategy = .convertToSnakeCase
        encoder.outputFormatting = [.sortedKeys]
        encoder.nonConformingFloatEncodingStrategy = .convertToString(positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
        return (try? String(decoding: encoder.encode(value), as: UTF8.self)) ?? "{}"
    }

    static func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s : s + String(repeating: " ", count: n - s.count) }
    static func lpad(_ s: String, _ n: Int) -> String { s.count >= n ? s : String(repeating: " ", count: n - s.count) + s }
    static func sci(_ x: Double?) -> String { x.map { String(format: "%.2e", $0) } ?? "-" }
    /// Seconds blocked in communication, least-most over ranks ("-" where not recorded).
    static func waits(least: Double?, most: Double?) -> String { most.map { String(format: "%.4f-%.4f", least ?? $0, $0) } ?? "-" }

    static func table(_ r: AttentionRunReport) -> String {
        let hosts = Set(r.perRank.map(\.host)).count
        var lines = [
            "# seqpar attention",
            "# algorithm \(r.algorithm.rawValue)\(r.ulyssesDegree.map { " (Ulysses groups of \($0), ring across \(r.ranks / $0))" } ?? ""), backend \(r.backend), \(r.ranks) rank(s) on \(hosts) host(s)"
                + (hosts > 1 ? "; bytes across hosts: forward \(r.crossHostBytes.forward)" + (r.crossHostBytes.backward.map { ", backward \($0)" } ?? "") : ""),
            "# B=\(r.batch) L=\(r.seqLen) H=\(r.heads) G=\(r.kvHeads) D=\(r.headDim), \(r.causal ? "causal" : r.decay == nil ? "full" : "bidirectional"), layout \(r.layout.rawValue), \(r.documents.map { "\($0) documents, " } ?? "")\(r.decay.map { "linear attention, decay \($0.map { String(format: "%g", $0) }.joined(separator: ",")), feature map \(r.featureMap?.rawValue ?? "identity")" } ?? "scale \(r.scale)")\(r.backwardRun ? ", forward+backward" : "")",
            "# memory estimate per rank \(SystemInfo.bytesText(r.memoryEstimateBytes))",
            "# precision \(r.precision.rawValue)" + (r.precision == .fp32 ? "" : r.decay == nil
                ? " (inputs rounded to bf16, K/V sent in bf16, outputs stored in bf16; statistics and accumulators fp32)"
                : " (inputs rounded to bf16, outputs stored in bf16)"),
            pad("phase", 10) + lpad("min_s", 12) + lpad("avg_s", 12) + lpad("max_s", 12),
        ]
        for phase in ["setup", "forward", "backward", "gather", "check"] {
            guard let t = r.timeS[phase] else { continue }
            lines.append(pad(phase, 10) + [t.min, t.avg, t.max].map { lpad(String(format: "%.4f", $0), 12) }.joined())
        }
        lines.append(String(format: "forward %.2f GFLOP/s", r.forwardGflops) + (r.backwardGflops.map { String(format: ", backward %.2f GFLOP/s", $0) } ?? "") + " (FLOPs over the slowest rank's time)")
        lines.append(pad("rank", 6) + pad("host", 16) + lpad("tokens", 8) + lpad("fwd_sent_B", 13) + lpad("fwd_recv_B", 13)
                     + lpad("bwd_sent_B", 13) + lpad("msgs", 6) + lpad("colls", 6) + lpad("peak_rss", 12))
        for s in r.perRank {
            let msgs = s.forward.messagesSent + (s.backward?.messagesSent ?? 0)
            let colls = s.forward.collectives + (s.backward?.collectives ?? 0)
            lines.append(pad("\(s.rank)", 6) + pad(String(s.host.prefix(15)), 16) + lpad("\(s.tokens)", 8)
                         + lpad("\(s.forward.bytesSent)", 13) + lpad("\(s.forward.bytesReceived)", 13)
                         + lpad(s.backward.map { "\($0.bytesSent)" } ?? "-", 13) + lpad("\(msgs)", 6) + lpad("\(colls)", 6)
                         + lpad(SystemInfo.bytesText(s.peakRSSBytes), 12))
        }
        if let c = r.check {
            lines.append("check: " + AttentionRun.checkSummary(c) + (c.passed ? ": PASS" : ": FAIL"))
            lines.append("check: per-rank forward error " + c.perRankForwardError.map { sci($0) }.joined(separator: " "))
        }
        return lines.joined(separator: "\n")
    }

    static func table(_ r: HybridRunReport) -> String {
        var lines = [
            "# seqpar attention: lasp2h hybrid stack \(r.layers) (L: linear attention, LASP-2; S: softmax attention, allgather), pre-norm, residual",
            "# backend \(r.backend), \(r.ranks) rank(s); B=\(r.batch) L=\(r.seqLen) H=\(r.heads) G=\(r.kvHeads) D=\(r.headDim), causal, decay \(r.decay.map { String(format: "%g", $0) }.joined(separator: ",")), feature map \(r.featureMap.rawValue)",
            "# memory estimate per rank \(SystemInfo.bytesText(r.memoryEstimateBytes)); \(String(format: "%.0f", r.tokensPerS)) tokens/s",
            pad("phase", 10) + lpad("min_s", 12) + lpad("avg_s", 12) + lpad("max_s", 12),
        ]
        for phase in ["forward", "backward"] {
            guard let t = r.timeS[phase] else { continue }
            lines.append(pad(phase, 10) + [t.min, t.avg, t.max].map { lpad(String(format: "%.4f", $0), 12) }.joined())
        }
        lines.append(pad("rank", 6) + lpad("sent_B", 13) + lpad("recv_B", 13) + lpad("colls", 7) + lpad("msgs", 6) + lpad("peak_rss", 12))
        for i in 0..<r.ranks {
            lines.append(pad("\(i)", 6) + lpad("\(r.bytesSent[i])", 13) + lpad("\(r.bytesReceived[i])", 13) + lpad("\(r.collectives[i])", 7)
                         + lpad("\(r.messages[i])", 6) + lpad(SystemInfo.bytesText(r.peakRSSBytes[i]), 12))
        }
        if let c = r.check { lines.append("check: " + c.summary + (c.passed ? ": PASS" : ": FAIL")) }
        return lines.joined(separator: "\n")
    }

    static func table(_ r: LatentRunReport) -> String {
        var lines = [
            "# seqpar attention: \(r.algorithm.rawValue), latent attention (absorbed MLA decode: every query attends the whole cache)",
            "# backend \(r.backend), \(r.ranks) rank(s); L=\(r.seqLen) T=\(r.queries) H=\(r.heads) d_c=\(r.latentDim) d_r=\(r.ropeDim) d_v=\(r.vDim), transform \(r.transform.rawValue), scale \(r.scale)",
            pad("phase", 10) + lpad("min_s", 12) + lpad("avg_s", 12) + lpad("max_s", 12),
        ]
        for phase in ["setup", "attend", "combine"] {
            guard let t = r.timeS[phase] else { continue }
            lines.append(pad(phase, 10) + [t.min, t.avg, t.max].map { lpad(String(format: "%.5f", $0), 12) }.joined())
        }
        lines.append(pad("rank", 6) + lpad("cache_B", 14) + lpad("sent_B", 12) + lpad("colls", 7) + lpad("peak_rss", 12))
        for i in 0..<r.ranks {
            lines.append(pad("\(i)", 6) + lpad("\(r.cacheBytes[i])", 14) + lpad("\(r.bytesSent[i])", 12) + lpad("\(r.collectives[i])", 7)
                         + lpad(SystemInfo.bytesText(r.peakRSSBytes[i]), 12))
        }
        if let d = r.tplaVsMLA {
            lines.append(String(format: "tpla vs mla: max relative difference %.3e (TPLA is an approximation for P > 1: each shard's softmax sees partial logits)", d))
        }
        if let c = r.check {
            lines.append(String(format: "check: max relative error %.2e against the Double %@ definition (tolerance %.0e)", c.error, c.reference, c.tolerance)
                         + (c.passed ? ": PASS" : ": FAIL"))
        }
        return lines.joined(separator: "\n")
    }
}
