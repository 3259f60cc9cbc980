//! The command a container of an image runs, decided as `docker run`
//! decides it: the image config's Entrypoint and Cmd with the user's
//! overrides ([`CommandOverrides`]), the environment it starts from
//! ([`image_env`]) and the `PATH` a bare program name is looked up on
//! ([`image_path`]). `naiad run` builds its argv from it, and
//! the image daemon uses it to know which program to load ahead.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// PATH used when the image's environment has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What the user gave instead of the image's command:
/// `docker run --entrypoint ENTRYPOINT IMAGE COMMAND...`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandOverrides {
    /// Replaces the image's Entrypoint; `""` clears it.
    pub entrypoint: Option<String>,
    /// Replaces the image's Cmd and follows the Entrypoint.
    pub command: Vec<String>,
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array).map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect()).unwrap_or_default()
}

impl CommandOverrides {
    /// The command line for `config` (the `config` object of an image
    /// config): Entrypoint + Cmd with these overrides. An Entrypoint given
    /// without a command drops the image's Cmd, as `docker run` does.
    pub fn command_line(&self, config: Option<&Value>) -> Vec<String> {
        let entrypoint = match &self.entrypoint {
            Some(e) if e.is_empty() => vec![],
            Some(e) => vec![e.clone()],
            None => strings(config.and_then(|c| c.get("Entrypoint"))),
        };
        let cmd = if !self.command.is_empty() {
            self.command.clone()
        } else if self.entrypoint.is_some() {
            vec![]
        } else {
            strings(config.and_then(|c| c.get("Cmd")))
        };
        entrypoint.into_iter().chain(cmd).collect()
    }
}

/// `config`'s Env (the `config` object of an image config), with
/// `PATH=`[`DEFAULT_PATH`] first when it sets no `PATH`: the environment a
/// container of the image starts from.
pub fn image_env(config: Option<&Value>) -> Vec<String> {
    let mut env = strings(config.and_then(|c| c.get("Env")));
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, format!("PATH={DEFAULT_PATH}"));
    }
    env
}

/// The `PATH` of `config`'s Env (the `config` object of an image config),
/// else [`DEFAULT_PATH`].
pub fn image_path(config: Option<&Value>) -> String {
    config
        .and_then(|c| c.get("Env"))
        .and_then(Value::as_array)
        .and_then(|env| env.iter().filter_map(Value::as_str).find_map(|e| e.strip_prefix("PATH=")))
        .unwrap_or(DEFAULT_PATH)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn over(entrypoint: Option<&str>, command: &[&str]) -> CommandOverrides {
        CommandOverrides { entrypoint: entrypoint.map(String::from), command: command.iter().map(|s| s.to_string()).collect() }
    }

    #[test]
    fn overrides_apply_as_docker_run_applies_them() {
        let both = json!({"Entrypoint": ["/bin/tini", "--"], "Cmd": ["node", "app.js"]});
        let cmd_only = json!({"Cmd": ["python3", "-c", "1"]});
        assert_eq!(over(None, &[]).command_line(Some(&both)), ["/bin/tini", "--", "node", "app.js"]);
        // Arguments replace Cmd and follow the Entrypoint.
        assert_eq!(over(None, &["bash"]).command_line(Some(&both)), ["/bin/tini", "--", "bash"]);
        assert_eq!(over(None, &["bash", "-c", "ls"]).command_line(Some(&cmd_only)), ["bash", "-c", "ls"]);
        // An Entrypoint given drops the image's Cmd; "" clears it.
        assert_eq!(over(Some("/bin/sh"), &[]).command_line(Some(&both)), ["/bin/sh"]);
        assert_eq!(over(Some(""), &["ls"]).command_line(Some(&both)), ["ls"]);
        assert_eq!(over(None, &[]).command_line(Some(&cmd_only)), ["python3", "-c", "1"]);
        assert!(over(None, &[]).command_line(Some(&json!({}))).is_empty());
        assert!(over(None, &[]).command_line(None).is_empty());
    }

    #[test]
    fn the_path_is_the_images_else_the_default() {
        assert_eq!(image_path(Some(&json!({"Env": ["A=1", "PATH=/opt/bin:/bin"]}))), "/opt/bin:/bin");
        assert_eq!(image_path(Some(&json!({"Env": ["A=1"]}))), DEFAULT_PATH);
        assert_eq!(image_path(None), DEFAULT_PATH);
    }

    #[test]
    fn the_env_gets_the_default_path_only_when_it_has_none() {
        assert_eq!(image_env(Some(&json!({"Env": ["A=1", "PATH=/opt/bin"]}))), ["A=1", "PATH=/opt/bin"]);
        assert_eq!(image_env(Some(&json!({"Env": ["A=1"]}))), [format!("PATH={DEFAULT_PATH}"), "A=1".into()]);
        assert_eq!(image_env(None), [format!("PATH={DEFAULT_PATH}")]);
    }
}
