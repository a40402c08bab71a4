"""cmrfm: cardiac-MRI foundation models. One command, `cmrfm`, over the four packages (see `cmrfm.cli`)."""
