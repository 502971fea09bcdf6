//! `Args`: a command's arguments (after its name), reached only through accessors that cannot
//! index out of bounds: a missing argument is the arity error Redis sends, never a panic.

use bytes::Bytes;

use super::reply::Reply;

/// The arguments of one request after the command name, and that name (for error replies).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Args<'a> {
    name: &'static str,
    args: &'a [Bytes],
}

impl<'a> Args<'a> {
    /// The arguments of the request `request` (name first) of the command `name`.
    pub(crate) fn new(name: &'static str, request: &'a [Bytes]) -> Args<'a> {
        Args { name, args: request.get(1..).unwrap_or(&[]) }
    }

    /// The command's name (lower case).
    pub(crate) fn name(&self) -> &'static str {
        self.name
    }

    /// How many arguments there are.
    pub(crate) fn len(&self) -> usize {
        self.args.len()
    }

    /// Argument `i`, or `None`.
    pub(crate) fn get(&self, i: usize) -> Option<&'a Bytes> {
        self.args.get(i)
    }

    /// Argument `i`, or the reply for a wrong number of arguments.
    pub(crate) fn arg(&self, i: usize) -> Result<&'a Bytes, Reply> {
        self.args.get(i).ok_or_else(|| self.arity_error())
    }

    /// The arguments from `i` on (empty past the end).
    pub(crate) fn from(&self, i: usize) -> &'a [Bytes] {
        self.args.get(i..).unwrap_or(&[])
    }

    /// All the arguments.
    pub(crate) fn all(&self) -> &'a [Bytes] {
        self.args
    }

    /// The reply to a request with the wrong number of arguments.
    pub(crate) fn arity_error(&self) -> Reply {
        Reply::err(format!("wrong number of arguments for '{}' command", self.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_arguments_are_arity_errors() {
        let req = [Bytes::from_static(b"GET"), Bytes::from_static(b"k")];
        let a = Args::new("get", &req);
        assert_eq!(a.len(), 1);
        assert_eq!(a.arg(0).unwrap(), "k");
        assert_eq!(
            a.arg(1).unwrap_err(),
            Reply::err("wrong number of arguments for 'get' command")
        );
        assert!(a.get(5).is_none());
        assert!(a.from(1).is_empty() && a.from(9).is_empty());
        assert!(Args::new("ping", &[]).all().is_empty());
    }
}
