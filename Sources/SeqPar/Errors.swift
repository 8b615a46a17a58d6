// Errors the library throws for bad input. Each message names the problem and says what to do.
// Library code throws; only the executable decides to exit.

public enum SeqParError: Error, CustomStringConvertible {
    public struct RankFailure: Sendable, Equatable { public let rank: Int; public let message: String }

    /// An option or shape that cannot work; the text says what to change.
    case invalidInput(String)
    /// NaN or infinity in an input tensor.
    case nonFinite(tensor: String, index: [Int], value: Float, axes: String)
    /// One or more ranks failed; every rank throws this after `Communicator.agree`.
    case onRanks([RankFailure])
    /// A result outside the tolerance of `--check`.
    case checkFailed(String)
    /// The run would need more memory than the machine has.
    case outOfMemory(String)

    /// True for errors every rank throws together (after an agreement or a broadcast verdict): a rank may then
    /// exit normally instead of aborting the job.
    public var isCollective: Bool {
        switch self {
        case .onRanks, .checkFailed: true
        default: false
        }
    }

    public var description: String {
        switch self {
        case let .invalidInput(text): return text
        case let .nonFinite(tensor, index, value, axes):
            return "\(tensor) holds \(value) at \(axes) \(index): inputs must be finite (check the file or the scaling that produced it)"
        case let .onRanks(failures):
            if failures.count == 1 { return "rank \(failures[0].rank): \(failures[0].message)" }
            let distinct = Set(failures.map(\.message))
            if distinct.count == 1 { return "ranks \(failures.map(\.rank)): \(failures[0].message)" }
            return failures.map { "rank \($0.rank): \($0.message)" }.joined(separator: "\n")
        case let .checkFailed(text): return "check failed: \(text)"
        case let .outOfMemory(text): return text
        }
    }
}
