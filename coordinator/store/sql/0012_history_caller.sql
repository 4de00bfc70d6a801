-- Who caused a transition (issue 17): the name of the token or client certificate of
-- the API call, for the transitions an API call causes while access control is on.
-- NULL for what replies and timers cause, and for everything before this version.
ALTER TABLE sagaplane_history ADD COLUMN caller text;
