// Facts about this process and machine that runs and reports need: time, memory, cores.
import Foundation
#if canImport(Glibc)
import Glibc
#endif

public enum SystemInfo {
    /// Monotonic seconds.
    public static func now() -> Double { Double(DispatchTime.now().uptimeNanoseconds) * 1e-9 }

    /// Peak resident set size of this process, in bytes (ru_maxrss).
    public static func peakRSS() -> Int {
        var usage = rusage()
        getrusage(__rusage_who_t(RUSAGE_SELF.rawValue), &usage)
        return Int(usage.ru_maxrss) * 1024
    }

    /// MemAvailable from /proc/meminfo, in bytes (nil where unknown).
    public static func availableMemory() -> Int? {
        guard let text = try? String(contentsOfFile: "/proc/meminfo", encoding: .utf8) else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix("MemAvailable:") {
            let parts = line.split(separator: " ")
            if parts.count >= 2, let kb = Int(parts[1]) { return kb * 1024 }
        }
        return nil
    }

    /// CPUs this process may run on (its affinity mask, from Cpus_allowed_list in /proc/self/status).
    public static func allowedCPUs() -> [Int] {
        guard let text = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8),
              let line = text.split(separator: "\n").first(where: { $0.hasPrefix("Cpus_allowed_list:") })
        else { return Array(0..<onlineCPUs) }
        var cpus: [Int] = []
        for part in line.dropFirst("Cpus_allowed_list:".count).trimmingCharacters(in: .whitespaces).split(separator: ",") {
            let ends = part.split(separator: "-").compactMap { Int($0) }
            if ends.count == 2 { cpus += Array(ends[0]...ends[1]) } else if ends.count == 1 { cpus.append(ends[0]) }
        }
        return cpus
    }

    /// CPUs online on this machine.
    public static var onlineCPUs: Int { Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))) }

    /// "0-3,8" style list.
    public static func cpuList(_ cpus: [Int]) -> String {
        var parts: [String] = []
        var i = 0
        while i < cpus.count {
            var j = i
            while j + 1 < cpus.count && cpus[j + 1] == cpus[j] + 1 { j += 1 }
            parts.append(i == j ? "\(cpus[i])" : "\(cpus[i])-\(cpus[j])")
            i = j + 1
        }
        return parts.joined(separator: ",")
    }

    public static var hostName: String { ProcessInfo.processInfo.hostName }

    public static func bytesText(_ bytes: Int) -> String {
        let b = Double(bytes), kib = 1024.0
        if b >= kib * kib * kib { return String(format: "%.2f GiB", b / (kib * kib * kib)) }
        if b >= kib * kib { return String(format: "%.1f MiB", b / (kib * kib)) }
        if b >= kib { return String(format: "%.1f KiB", b / kib) }
        return "\(bytes) B"
    }
}
