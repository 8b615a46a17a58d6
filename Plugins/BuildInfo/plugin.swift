// Records the commit `seqpar` is built from: before every build of the target it applies to, runs build-info.sh,
// which writes BuildInfo.swift (`BuildInfo.commit`) from $SEQPAR_COMMIT or `git rev-parse` in the package, and
// rewrites it only when the commit changed (so an unchanged commit recompiles nothing).
import Foundation
import PackagePlugin

@main
struct BuildInfoPlugin: BuildToolPlugin {
    func createBuildCommands(context: PluginContext, target: Target) throws -> [Command] {
        let output = context.pluginWorkDirectoryURL.appending(path: "BuildInfo")
        let package = context.package.directoryURL
        var environment: [String: String] = [:]
        if let commit = ProcessInfo.processInfo.environment["SEQPAR_COMMIT"] { environment["SEQPAR_COMMIT"] = commit }
        return [.prebuildCommand(
            displayName: "BuildInfo: the commit \(target.name) is built from",
            executable: URL(fileURLWithPath: "/bin/sh"),
            arguments: [package.appending(path: "Plugins/BuildInfo/build-info.sh").path, package.path, output.path],
            environment: environment,
            outputFilesDirectory: output)]
    }
}
