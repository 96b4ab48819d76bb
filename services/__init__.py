"""gridloop's microservices: intake, dispatch, handling, verification, opscenter; and what they share."""
